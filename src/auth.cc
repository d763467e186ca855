// Service tokens and JWT user tokens (docs/auth.md).
//
// JWTs are verified with OpenSSL directly rather than with Debian 12's libjwt
// 1.10, which takes the algorithm from the token's own header: here the
// algorithm and the key are fixed by configuration, so "alg":"none" or an
// HS256 token "signed" with the RS256 public key can never be accepted.
#include "chatd/auth.h"

#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/pem.h>
#include <rapidjson/document.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <utility>
#include <vector>

#include "chatd/log.h"
#include "secret_strength.h"
#include "chatd/user_id.h"

namespace chatd {

namespace {

// Secrets: the group may read them (0640, like the environment file), nobody
// else may read, nobody but the owner may write. A public key is not secret,
// but whoever can write it can mint tokens.
constexpr mode_t kSecretForbiddenBits = 0027;
constexpr mode_t kPublicKeyForbiddenBits = 0022;
constexpr size_t kMaxProtectedFileBytes = 64 * 1024;

// RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
constexpr size_t kMinHs256SecretBytes = 32;
// Service tokens are bearer secrets too; short ones can be guessed.
constexpr size_t kMinServiceTokenBytes = 16;
constexpr size_t kMaxServiceTokens = 64;
constexpr int64_t kDefaultLeewayS = 30;
constexpr int64_t kMaxLeewayS = 600;
constexpr int kMinRsaBits = 2048;
constexpr size_t kSha256Bytes = 32;
constexpr size_t kEs256CoordinateBytes = 32;
// SEQUENCE of two INTEGERs of at most 33 bytes each.
constexpr size_t kMaxEs256DerBytes = 80;
// Header length beyond the token: the scheme and its spaces.
constexpr size_t kMaxSchemeSlackBytes = 64;

// A header and a payload of a few hundred bytes parse without touching the
// heap; larger ones (up to the token limit) fall back to malloc.
constexpr size_t kJsonValueBufferBytes = 4096;
constexpr size_t kJsonStackBufferBytes = 1024;
constexpr size_t kJsonStackCapacity = 512;
// Iterative: no recursion on nesting. Encoding validated, as for request bodies.
constexpr unsigned kJsonParseFlags = rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag;

using JsonAllocator = rapidjson::MemoryPoolAllocator<>;
using JsonDocument = rapidjson::GenericDocument<rapidjson::UTF8<>, JsonAllocator, JsonAllocator>;

struct EvpPkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct EvpMdFree {
  void operator()(EVP_MD* p) const { EVP_MD_free(p); }
};
struct EvpMdCtxFree {
  void operator()(EVP_MD_CTX* p) const { EVP_MD_CTX_free(p); }
};
struct EvpMacFree {
  void operator()(EVP_MAC* p) const { EVP_MAC_free(p); }
};
struct EvpMacCtxFree {
  void operator()(EVP_MAC_CTX* p) const { EVP_MAC_CTX_free(p); }
};
struct BioFree {
  void operator()(BIO* p) const { BIO_free(p); }
};
struct EcdsaSigFree {
  void operator()(ECDSA_SIG* p) const { ECDSA_SIG_free(p); }
};
struct BignumFree {
  void operator()(BIGNUM* p) const { BN_free(p); }
};
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyFree>;
using EvpMdPtr = std::unique_ptr<EVP_MD, EvpMdFree>;
using EvpMdCtxPtr = std::unique_ptr<EVP_MD_CTX, EvpMdCtxFree>;
using EvpMacPtr = std::unique_ptr<EVP_MAC, EvpMacFree>;
using EvpMacCtxPtr = std::unique_ptr<EVP_MAC_CTX, EvpMacCtxFree>;
using BioPtr = std::unique_ptr<BIO, BioFree>;
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, EcdsaSigFree>;
using BignumPtr = std::unique_ptr<BIGNUM, BignumFree>;

class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Wipes a copy of a secret once it has been turned into what we keep.
class ScopedCleanse {
 public:
  explicit ScopedCleanse(std::string& s) : s_(s) {}
  ~ScopedCleanse() {
    if (!s_.empty()) OPENSSL_cleanse(s_.data(), s_.size());
  }
  ScopedCleanse(const ScopedCleanse&) = delete;
  ScopedCleanse& operator=(const ScopedCleanse&) = delete;

 private:
  std::string& s_;
};

using Digest = std::array<unsigned char, kSha256Bytes>;

Status Unauthorized(const char* reason, const char* message) {
  return Status(Code::kUnauthorized, reason, message);
}

Status BadConfig(std::string_view variable, std::string_view why) {
  std::string message(variable);
  message.append(" ").append(why);
  return InvalidArgument("bad_config", std::move(message));
}

// Unset and empty are the same: an empty secret is never what was meant.
std::optional<std::string> Get(const EnvLookup& env, const char* name) {
  std::optional<std::string> v = env(name);
  if (v && v->empty()) return std::nullopt;
  return v;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool EqualsIgnoreAsciiCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

bool IsAlnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

// RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
bool IsB64Token(std::string_view s) {
  size_t end = s.size();
  while (end > 0 && s[end - 1] == '=') --end;
  if (end == 0) return false;
  for (size_t i = 0; i < end; ++i) {
    char c = s[i];
    if (!(IsAlnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/')) return false;
  }
  return true;
}

int Base64UrlValue(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

std::string_view AsView(const rapidjson::Value& v) { return std::string_view(v.GetString(), v.GetStringLength()); }

// RapidJSON keeps duplicate members and FindMember returns the first, while
// the issuer's library may have meant the last: refuse the ambiguity.
bool HasDuplicate(const rapidjson::Value& obj, std::initializer_list<std::string_view> names) {
  for (std::string_view name : names) {
    int n = 0;
    for (auto it = obj.MemberBegin(); it != obj.MemberEnd(); ++it) {
      if (AsView(it->name) == name && ++n > 1) return true;
    }
  }
  return false;
}

const rapidjson::Value* Member(const rapidjson::Value& obj, const char* name) {
  auto it = obj.FindMember(name);
  return it == obj.MemberEnd() ? nullptr : &it->value;
}

bool Sha256(const EVP_MD* md, std::string_view data, Digest& out) {
  unsigned int len = 0;
  bool ok = EVP_Digest(data.data(), data.size(), out.data(), &len, md, nullptr) == 1 && len == out.size();
  if (!ok) ERR_clear_error();
  return ok;
}

// Logs every refusal (reason, never the token) and counts them per process;
// the request log line carries the same reason for the pool's metrics.
class LoggingAuthenticator : public Authenticator {
 public:
  explicit LoggingAuthenticator(const char* mode) : mode_(mode) {}

  Result<Principal> Authenticate(const HttpRequest& req) final {
    Result<Principal> who = Verify(req);
    if (!who.ok()) {
      uint64_t n = failures_.fetch_add(1, std::memory_order_relaxed) + 1;
      LogWarn("auth_failed")
          .Str("mode", mode_)
          .Str("reason", who.status().reason())
          .Str("request_id", req.request_id)
          .Str("remote_addr", req.remote_addr)
          .Int("failures", static_cast<int64_t>(n))
          .Emit();
    }
    return who;
  }

 protected:
  virtual Result<Principal> Verify(const HttpRequest& req) = 0;

 private:
  const char* mode_;
  std::atomic<uint64_t> failures_{0};
};

// ---------------------------------------------------------------------------
// Service tokens

class ServiceTokenAuthenticator final : public LoggingAuthenticator {
 public:
  ServiceTokenAuthenticator(EvpMdPtr sha256, std::vector<Digest> digests)
      : LoggingAuthenticator("service"), sha256_(std::move(sha256)), digests_(std::move(digests)) {}

 protected:
  Result<Principal> Verify(const HttpRequest& req) override {
    Result<std::string_view> token = BearerToken(req.authorization);
    if (!token.ok()) return token.status();
    Digest presented;
    if (!Sha256(sha256_.get(), *token, presented)) return Internal("digest_failed", "Internal error");
    // Every configured digest is compared, whatever matched first, so the
    // time taken says nothing about which token (or which prefix) was close.
    int matched = 0;
    for (const Digest& known : digests_) {
      matched |= static_cast<int>(CRYPTO_memcmp(presented.data(), known.data(), known.size()) == 0);
    }
    if (matched == 0) return Unauthorized("invalid_token", "The bearer token is not valid");
    return Principal{};
  }

 private:
  EvpMdPtr sha256_;
  std::vector<Digest> digests_;
};

Status AddServiceTokens(std::string_view variable, std::string_view text, char separator, bool allow_comments,
                        const EVP_MD* md, std::vector<Digest>& digests) {
  size_t start = 0;
  size_t index = 0;
  while (start <= text.size()) {
    size_t end = text.find(separator, start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view token = Trim(text.substr(start, end - start));
    start = end + 1;
    if (token.empty() || (allow_comments && token.front() == '#')) continue;
    ++index;
    // Errors say which entry, never what it is.
    std::string which = "entry " + std::to_string(index);
    if (token.size() < kMinServiceTokenBytes) {
      return BadConfig(variable, which + " is shorter than " + std::to_string(kMinServiceTokenBytes) +
                                     " characters: use a long random token (openssl rand -hex 32)");
    }
    if (token.size() > kMaxBearerTokenBytes) {
      return BadConfig(variable, which + " is longer than " + std::to_string(kMaxBearerTokenBytes) + " bytes");
    }
    if (!IsB64Token(token)) {
      return BadConfig(variable, which + " has characters a bearer token cannot carry (allowed: A-Z a-z 0-9 - . _ ~ + / "
                                         "and trailing =)");
    }
    if (std::optional<std::string> weak = SecretWeakness(token)) return BadConfig(variable, which + " " + *weak);
    if (digests.size() >= kMaxServiceTokens) {
      return BadConfig(variable, "lists more than " + std::to_string(kMaxServiceTokens) + " tokens");
    }
    Digest d;
    if (!Sha256(md, token, d)) return Internal("digest_failed", "SHA-256 is not available in OpenSSL");
    digests.push_back(d);
  }
  return Status::Ok();
}

Result<std::unique_ptr<Authenticator>> MakeServiceAuthenticator(const EnvLookup& env) {
  constexpr const char* kInline = "CHATD_SERVICE_TOKENS";
  constexpr const char* kFile = "CHATD_SERVICE_TOKENS_FILE";
  std::optional<std::string> inline_tokens = Get(env, kInline);
  std::optional<std::string> file = Get(env, kFile);
  std::string inline_text = inline_tokens ? std::move(*inline_tokens) : std::string();
  ScopedCleanse wipe_copy(inline_text);
  if (inline_tokens && file) return BadConfig(kInline, "and CHATD_SERVICE_TOKENS_FILE are both set: set only one");
  if (!inline_tokens && !file) {
    return BadConfig(kInline, "(or CHATD_SERVICE_TOKENS_FILE) is required when CHATD_AUTH_MODE=service");
  }

  EvpMdPtr sha256(EVP_MD_fetch(nullptr, "SHA256", nullptr));
  if (!sha256) return Internal("digest_failed", "SHA-256 is not available in OpenSSL");
  std::vector<Digest> digests;
  if (inline_tokens) {
    Status s = AddServiceTokens(kInline, inline_text, ',', /*allow_comments=*/false, sha256.get(), digests);
    if (!s.ok()) return s;
  } else {
    Result<std::string> text = ReadProtectedFile(*file, kFile, kSecretForbiddenBits);
    if (!text.ok()) return text.status();
    ScopedCleanse wipe_file(*text);
    Status s = AddServiceTokens(kFile, *text, '\n', /*allow_comments=*/true, sha256.get(), digests);
    if (!s.ok()) return s;
  }
  if (digests.empty()) return BadConfig(inline_tokens ? kInline : kFile, "contains no token");
  std::unique_ptr<Authenticator> auth =
      std::make_unique<ServiceTokenAuthenticator>(std::move(sha256), std::move(digests));
  return auth;
}

// ---------------------------------------------------------------------------
// JWT

enum class JwtAlgorithm { kHs256, kRs256, kEs256 };

struct JwtSettings {
  JwtAlgorithm algorithm = JwtAlgorithm::kHs256;
  const char* algorithm_name = "HS256";
  std::optional<std::string> issuer;
  std::optional<std::string> audience;
  int64_t leeway_s = kDefaultLeewayS;
};

// Per-thread buffers for the decoded segments: their capacity survives from
// one request to the next, so decoding allocates only on a thread's first
// large token.
struct DecodeScratch {
  std::string header;
  std::string payload;
  std::string signature;
};

DecodeScratch& ThreadScratch() {
  thread_local DecodeScratch scratch;
  return scratch;
}

// A parsed JSON object on a stack buffer; valid while the parser lives.
class JsonObjectParser {
 public:
  JsonObjectParser()
      : values_(value_buffer_, sizeof(value_buffer_)),
        stack_(stack_buffer_, sizeof(stack_buffer_)),
        doc_(&values_, kJsonStackCapacity, &stack_) {}
  JsonObjectParser(const JsonObjectParser&) = delete;
  JsonObjectParser& operator=(const JsonObjectParser&) = delete;

  // The root value when `text` is exactly one JSON object, else nullptr.
  const rapidjson::Value* Parse(std::string_view text) {
    doc_.Parse<kJsonParseFlags>(text.data(), text.size());
    if (doc_.HasParseError() || !doc_.IsObject()) return nullptr;
    return &doc_;
  }

 private:
  alignas(std::max_align_t) char value_buffer_[kJsonValueBufferBytes];
  alignas(std::max_align_t) char stack_buffer_[kJsonStackBufferBytes];
  JsonAllocator values_;
  JsonAllocator stack_;
  JsonDocument doc_;
};

class JwtAuthenticator final : public LoggingAuthenticator {
 public:
  JwtAuthenticator(JwtSettings settings, EpochSecondsFn now, EvpMdPtr sha256, EvpPkeyPtr key,
                   EvpMacCtxPtr hmac_template)
      : LoggingAuthenticator("jwt"),
        settings_(std::move(settings)),
        now_(std::move(now)),
        sha256_(std::move(sha256)),
        key_(std::move(key)),
        hmac_template_(std::move(hmac_template)) {}

 protected:
  Result<Principal> Verify(const HttpRequest& req) override {
    Result<std::string_view> bearer = BearerToken(req.authorization);
    if (!bearer.ok()) return bearer.status();
    std::string_view token = *bearer;

    // header.payload.signature, base64url only.
    const size_t dot1 = token.find('.');
    const size_t dot2 = dot1 == std::string_view::npos ? dot1 : token.find('.', dot1 + 1);
    if (dot2 == std::string_view::npos || token.find('.', dot2 + 1) != std::string_view::npos) {
      return Unauthorized("malformed_token", "The bearer token is not a JWT (header.payload.signature)");
    }
    DecodeScratch& scratch = ThreadScratch();
    if (!Base64UrlDecode(token.substr(0, dot1), scratch.header) ||
        !Base64UrlDecode(token.substr(dot1 + 1, dot2 - dot1 - 1), scratch.payload) ||
        !Base64UrlDecode(token.substr(dot2 + 1), scratch.signature)) {
      return Unauthorized("malformed_token", "The bearer token is not valid base64url");
    }

    {
      JsonObjectParser parser;
      const rapidjson::Value* header = parser.Parse(scratch.header);
      if (header == nullptr || HasDuplicate(*header, {"alg", "crit"})) {
        return Unauthorized("malformed_token", "The token header is not a JSON object");
      }
      // The algorithm is the configured one, whatever the token claims.
      const rapidjson::Value* alg = Member(*header, "alg");
      if (alg == nullptr || !alg->IsString() || AsView(*alg) != settings_.algorithm_name) {
        return Unauthorized("wrong_algorithm", "The token is not signed with the algorithm this service accepts");
      }
      // RFC 7515 section 4.1.11: we understand no extension, so any critical
      // one makes the token unusable.
      if (Member(*header, "crit") != nullptr) {
        return Unauthorized("unsupported_header", "The token header has critical extensions we do not support");
      }
    }

    if (!SignatureIsValid(token.substr(0, dot2), scratch.signature)) {
      return Unauthorized("bad_signature", "The token signature is not valid");
    }
    return CheckClaims(scratch.payload);
  }

 private:
  bool SignatureIsValid(std::string_view signing_input, std::string_view signature) const {
    bool ok = false;
    switch (settings_.algorithm) {
      case JwtAlgorithm::kHs256:
        ok = HmacIsValid(signing_input, signature);
        break;
      case JwtAlgorithm::kRs256:
        ok = PublicKeySignatureIsValid(signing_input, reinterpret_cast<const unsigned char*>(signature.data()),
                                       signature.size());
        break;
      case JwtAlgorithm::kEs256:
        ok = EcdsaIsValid(signing_input, signature);
        break;
    }
    // A failed verification leaves errors on this thread's OpenSSL queue,
    // where libcurl would later find them and blame its own calls.
    if (!ok) ERR_clear_error();
    return ok;
  }

  bool HmacIsValid(std::string_view signing_input, std::string_view signature) const {
    if (signature.size() != kSha256Bytes) return false;
    // The template is keyed once at start-up; a copy per request is cheaper
    // than re-deriving the HMAC key blocks.
    EvpMacCtxPtr ctx(EVP_MAC_CTX_dup(hmac_template_.get()));
    if (!ctx) return false;
    unsigned char mac[EVP_MAX_MD_SIZE];
    size_t len = 0;
    if (EVP_MAC_update(ctx.get(), reinterpret_cast<const unsigned char*>(signing_input.data()),
                       signing_input.size()) != 1 ||
        EVP_MAC_final(ctx.get(), mac, &len, sizeof(mac)) != 1 || len != kSha256Bytes) {
      return false;
    }
    return CRYPTO_memcmp(mac, signature.data(), kSha256Bytes) == 0;
  }

  bool PublicKeySignatureIsValid(std::string_view signing_input, const unsigned char* sig, size_t sig_len) const {
    EvpMdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx) return false;
    if (EVP_DigestVerifyInit(ctx.get(), nullptr, sha256_.get(), nullptr, key_.get()) != 1) return false;
    return EVP_DigestVerify(ctx.get(), sig, sig_len, reinterpret_cast<const unsigned char*>(signing_input.data()),
                            signing_input.size()) == 1;
  }

  // JOSE carries an ES256 signature as r||s (32 bytes each, RFC 7518 section
  // 3.4); OpenSSL wants the DER SEQUENCE of two INTEGERs.
  bool EcdsaIsValid(std::string_view signing_input, std::string_view signature) const {
    if (signature.size() != 2 * kEs256CoordinateBytes) return false;
    const auto* raw = reinterpret_cast<const unsigned char*>(signature.data());
    BignumPtr r(BN_bin2bn(raw, kEs256CoordinateBytes, nullptr));
    BignumPtr s(BN_bin2bn(raw + kEs256CoordinateBytes, kEs256CoordinateBytes, nullptr));
    EcdsaSigPtr sig(ECDSA_SIG_new());
    if (!r || !s || !sig || ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) return false;
    r.release();  // owned by sig now
    s.release();
    int der_len = i2d_ECDSA_SIG(sig.get(), nullptr);
    if (der_len <= 0 || static_cast<size_t>(der_len) > kMaxEs256DerBytes) return false;
    unsigned char der[kMaxEs256DerBytes];
    unsigned char* out = der;
    if (i2d_ECDSA_SIG(sig.get(), &out) != der_len) return false;
    return PublicKeySignatureIsValid(signing_input, der, static_cast<size_t>(der_len));
  }

  Result<Principal> CheckClaims(std::string_view payload_text) const {
    JsonObjectParser parser;
    const rapidjson::Value* payload = parser.Parse(payload_text);
    if (payload == nullptr || HasDuplicate(*payload, {"exp", "nbf", "iat", "iss", "aud", "sub"})) {
      return Unauthorized("malformed_token", "The token payload is not a JSON object");
    }
    const double now = static_cast<double>(now_());
    const double leeway = static_cast<double>(settings_.leeway_s);

    // A token that never expires stays a master key forever once leaked.
    const rapidjson::Value* exp = Member(*payload, "exp");
    if (exp == nullptr || !exp->IsNumber()) {
      return Unauthorized("missing_expiry", "The token has no numeric expiry (exp)");
    }
    if (now >= exp->GetDouble() + leeway) return Unauthorized("token_expired", "The token has expired");

    if (const rapidjson::Value* nbf = Member(*payload, "nbf")) {
      if (!nbf->IsNumber()) return Unauthorized("malformed_token", "The token's nbf is not a number");
      if (now + leeway < nbf->GetDouble()) return Unauthorized("token_not_yet_valid", "The token is not valid yet");
    }
    if (const rapidjson::Value* iat = Member(*payload, "iat"); iat != nullptr && !iat->IsNumber()) {
      return Unauthorized("malformed_token", "The token's iat is not a number");
    }

    if (settings_.issuer) {
      const rapidjson::Value* iss = Member(*payload, "iss");
      if (iss == nullptr || !iss->IsString() || AsView(*iss) != *settings_.issuer) {
        return Unauthorized("wrong_issuer", "The token was not issued by the issuer this service trusts");
      }
    }

    // RFC 7519 section 4.1.3: a token that names audiences must name us; one
    // meant for another service is refused even when we configured none.
    const rapidjson::Value* aud = Member(*payload, "aud");
    if (aud != nullptr || settings_.audience) {
      if (aud == nullptr || !settings_.audience || !AudienceMatches(*aud, *settings_.audience)) {
        return Unauthorized("wrong_audience", "The token is not meant for this service");
      }
    }

    const rapidjson::Value* sub = Member(*payload, "sub");
    if (sub == nullptr) return Unauthorized("missing_subject", "The token has no subject (sub)");
    // No normalisation: "Alice" and "alice" are different users.
    if (!sub->IsString() || !IsValidUserId(AsView(*sub))) {
      return Unauthorized("invalid_subject", "The token's subject is not a valid userId");
    }
    Principal principal;
    principal.subject.emplace(sub->GetString(), sub->GetStringLength());
    return principal;
  }

  static bool AudienceMatches(const rapidjson::Value& aud, std::string_view expected) {
    if (aud.IsString()) return AsView(aud) == expected;
    if (!aud.IsArray() || aud.Empty()) return false;
    bool found = false;
    for (const rapidjson::Value& item : aud.GetArray()) {
      if (!item.IsString()) return false;  // a malformed list is not half-trusted
      found = found || AsView(item) == expected;
    }
    return found;
  }

  const JwtSettings settings_;
  const EpochSecondsFn now_;
  const EvpMdPtr sha256_;
  const EvpPkeyPtr key_;             // RS256, ES256
  const EvpMacCtxPtr hmac_template_;  // HS256
};

Result<std::string> ReadHs256Secret(const EnvLookup& env) {
  constexpr const char* kInline = "CHATD_JWT_SECRET";
  constexpr const char* kFile = "CHATD_JWT_SECRET_FILE";
  std::optional<std::string> inline_secret = Get(env, kInline);
  std::optional<std::string> file = Get(env, kFile);
  if (inline_secret && file) return BadConfig(kInline, "and CHATD_JWT_SECRET_FILE are both set: set only one");
  if (!inline_secret && !file) {
    return BadConfig(kInline, "(or CHATD_JWT_SECRET_FILE) is required when CHATD_JWT_ALGORITHM=HS256");
  }
  std::string secret;
  if (inline_secret) {
    secret = std::move(*inline_secret);
  } else {
    Result<std::string> text = ReadProtectedFile(*file, kFile, kSecretForbiddenBits);
    if (!text.ok()) return text.status();
    secret = std::move(*text);
    // Editors end files with a newline that nobody means as part of the key.
    while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) secret.pop_back();
  }
  if (secret.size() < kMinHs256SecretBytes) {
    OPENSSL_cleanse(secret.data(), secret.size());
    return BadConfig(inline_secret ? kInline : kFile,
                     "must be at least " + std::to_string(kMinHs256SecretBytes) +
                         " bytes (openssl rand -base64 48 makes a good one)");
  }
  // Long enough is not strong enough: the example file's placeholder is 42 bytes.
  if (std::optional<std::string> weak = SecretWeakness(secret)) {
    OPENSSL_cleanse(secret.data(), secret.size());
    return BadConfig(inline_secret ? kInline : kFile, *weak);
  }
  return secret;
}

Result<EvpMacCtxPtr> MakeHmacTemplate(std::string& secret) {
  ScopedCleanse wipe(secret);
  EvpMacPtr mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr));
  EvpMacCtxPtr ctx(mac ? EVP_MAC_CTX_new(mac.get()) : nullptr);
  char digest_name[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest_name, 0),
                         OSSL_PARAM_construct_end()};
  if (!ctx || EVP_MAC_init(ctx.get(), reinterpret_cast<const unsigned char*>(secret.data()), secret.size(),
                           params) != 1) {
    ERR_clear_error();
    return Internal("hmac_unavailable", "HMAC-SHA256 is not available in OpenSSL");
  }
  return ctx;
}

Result<EvpPkeyPtr> ReadPublicKey(const EnvLookup& env, JwtAlgorithm algorithm) {
  constexpr const char* kFile = "CHATD_JWT_PUBLIC_KEY_FILE";
  std::optional<std::string> file = Get(env, kFile);
  if (!file) return BadConfig(kFile, "is required when CHATD_JWT_ALGORITHM is RS256 or ES256");
  Result<std::string> pem = ReadProtectedFile(*file, kFile, kPublicKeyForbiddenBits);
  if (!pem.ok()) return pem.status();
  BioPtr bio(BIO_new_mem_buf(pem->data(), static_cast<int>(pem->size())));
  EvpPkeyPtr key(bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  ERR_clear_error();
  if (!key) return BadConfig(kFile, "is not a PEM public key (\"-----BEGIN PUBLIC KEY-----\")");
  if (algorithm == JwtAlgorithm::kRs256) {
    if (EVP_PKEY_get_base_id(key.get()) != EVP_PKEY_RSA) return BadConfig(kFile, "is not an RSA key (RS256)");
    if (EVP_PKEY_get_bits(key.get()) < kMinRsaBits) {
      return BadConfig(kFile, "is an RSA key shorter than " + std::to_string(kMinRsaBits) + " bits");
    }
  } else {
    char group[64] = {0};
    size_t group_len = 0;
    if (EVP_PKEY_get_base_id(key.get()) != EVP_PKEY_EC ||
        EVP_PKEY_get_group_name(key.get(), group, sizeof(group), &group_len) != 1 ||
        std::string_view(group, group_len) != "prime256v1") {
      ERR_clear_error();
      return BadConfig(kFile, "is not an EC key on curve P-256 (ES256)");
    }
  }
  return key;
}

Result<int64_t> ReadLeeway(const EnvLookup& env) {
  constexpr const char* kName = "CHATD_JWT_LEEWAY_S";
  std::optional<std::string> v = Get(env, kName);
  if (!v) return kDefaultLeewayS;
  int64_t n = 0;
  for (char c : *v) {
    if (c < '0' || c > '9' || n > kMaxLeewayS) {
      n = -1;
      break;
    }
    n = n * 10 + (c - '0');
  }
  if (n < 0 || n > kMaxLeewayS) {
    return BadConfig(kName, "must be a whole number of seconds from 0 to " + std::to_string(kMaxLeewayS) +
                                ", got \"" + *v + "\"");
  }
  return n;
}

Result<std::unique_ptr<Authenticator>> MakeJwtAuthenticator(const EnvLookup& env, EpochSecondsFn now) {
  JwtSettings settings;
  std::optional<std::string> alg = Get(env, "CHATD_JWT_ALGORITHM");
  if (!alg) {
    return BadConfig("CHATD_JWT_ALGORITHM",
                     "is required when CHATD_AUTH_MODE=jwt (the default): HS256, RS256 or ES256; or choose "
                     "CHATD_AUTH_MODE=service, or off for a local demo (docs/auth.md)");
  }
  if (*alg == "HS256") {
    settings.algorithm = JwtAlgorithm::kHs256;
  } else if (*alg == "RS256") {
    settings.algorithm = JwtAlgorithm::kRs256;
  } else if (*alg == "ES256") {
    settings.algorithm = JwtAlgorithm::kEs256;
  } else {
    return BadConfig("CHATD_JWT_ALGORITHM", "must be one of HS256, RS256, ES256, got \"" + *alg + "\"");
  }
  settings.algorithm_name = settings.algorithm == JwtAlgorithm::kHs256   ? "HS256"
                            : settings.algorithm == JwtAlgorithm::kRs256 ? "RS256"
                                                                         : "ES256";
  settings.issuer = Get(env, "CHATD_JWT_ISSUER");
  settings.audience = Get(env, "CHATD_JWT_AUDIENCE");
  // Optional, but without them a token signed with our key is accepted from
  // any issuer, and one naming no audience whatever it was minted for: say so
  // once per process, at start-up.
  if (!settings.issuer || !settings.audience) {
    std::string unset = !settings.issuer && !settings.audience ? "CHATD_JWT_ISSUER, CHATD_JWT_AUDIENCE"
                        : !settings.issuer                     ? "CHATD_JWT_ISSUER"
                                                               : "CHATD_JWT_AUDIENCE";
    LogWarn("jwt_claims_unchecked")
        .Str("unset", unset)
        .Str("detail", "a token signed with the key is accepted whoever issued it and, if it names no audience, "
                       "whichever service it was meant for")
        .Emit();
  }
  Result<int64_t> leeway = ReadLeeway(env);
  if (!leeway.ok()) return leeway.status();
  settings.leeway_s = *leeway;

  EvpMdPtr sha256(EVP_MD_fetch(nullptr, "SHA256", nullptr));
  if (!sha256) return Internal("digest_failed", "SHA-256 is not available in OpenSSL");

  // A key of the other family configured alongside is a mistake worth
  // stopping for: it is how HS/RS confusion starts.
  EvpPkeyPtr key;
  EvpMacCtxPtr hmac;
  if (settings.algorithm == JwtAlgorithm::kHs256) {
    if (Get(env, "CHATD_JWT_PUBLIC_KEY_FILE")) {
      return BadConfig("CHATD_JWT_PUBLIC_KEY_FILE", "is for RS256 and ES256; HS256 uses CHATD_JWT_SECRET");
    }
    Result<std::string> secret = ReadHs256Secret(env);
    if (!secret.ok()) return secret.status();
    Result<EvpMacCtxPtr> made = MakeHmacTemplate(*secret);
    if (!made.ok()) return made.status();
    hmac = std::move(*made);
  } else {
    if (Get(env, "CHATD_JWT_SECRET") || Get(env, "CHATD_JWT_SECRET_FILE")) {
      return BadConfig("CHATD_JWT_SECRET", "(or CHATD_JWT_SECRET_FILE) is for HS256 only; " +
                                               std::string(settings.algorithm_name) +
                                               " uses CHATD_JWT_PUBLIC_KEY_FILE");
    }
    Result<EvpPkeyPtr> read = ReadPublicKey(env, settings.algorithm);
    if (!read.ok()) return read.status();
    key = std::move(*read);
  }
  if (!now) now = [] { return static_cast<int64_t>(std::time(nullptr)); };
  std::unique_ptr<Authenticator> auth = std::make_unique<JwtAuthenticator>(
      std::move(settings), std::move(now), std::move(sha256), std::move(key), std::move(hmac));
  return auth;
}

}  // namespace

Result<std::string_view> BearerToken(std::string_view authorization) {
  if (authorization.empty()) return Unauthorized("missing_token", "Send Authorization: Bearer <token>");
  if (authorization.size() > kMaxBearerTokenBytes + kMaxSchemeSlackBytes) {
    return Unauthorized("token_too_long", "The bearer token is too long");
  }
  constexpr std::string_view kScheme = "bearer";
  if (authorization.size() <= kScheme.size() ||
      !EqualsIgnoreAsciiCase(authorization.substr(0, kScheme.size()), kScheme) ||
      authorization[kScheme.size()] != ' ') {
    return Unauthorized("bad_auth_scheme", "Use the Bearer authorization scheme");
  }
  std::string_view token = authorization.substr(kScheme.size());
  while (!token.empty() && token.front() == ' ') token.remove_prefix(1);
  if (token.size() > kMaxBearerTokenBytes) return Unauthorized("token_too_long", "The bearer token is too long");
  // Also refuses a second credential after a comma or a space.
  if (!IsB64Token(token)) return Unauthorized("malformed_token", "The bearer token is malformed");
  return token;
}

bool Base64UrlDecode(std::string_view in, std::string& out) {
  out.clear();
  // One character alone carries 6 bits: not even one byte.
  if (in.size() % 4 == 1) return false;
  out.reserve(in.size() / 4 * 3 + 2);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    int v = Base64UrlValue(c);
    if (v < 0) return false;
    acc = ((acc << 6) | static_cast<uint32_t>(v)) & 0xffffu;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xffu));
    }
  }
  return (acc & ((1u << bits) - 1u)) == 0;  // unused low bits must be zero
}

Result<std::string> ReadProtectedFile(const std::string& path, std::string_view variable,
                                      mode_t forbidden_mode_bits) {
  // O_NONBLOCK: a FIFO in place of the file must not hang start-up; fstat on
  // the open descriptor checks the very file we read.
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  if (fd.get() < 0) return BadConfig(variable, "cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return BadConfig(variable, "cannot stat " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return BadConfig(variable, path + " is not a regular file");
  if ((st.st_mode & forbidden_mode_bits) != 0) {
    char modes[96];
    std::snprintf(modes, sizeof(modes), "has mode %04o but at most %04o is allowed: chmod %s",
                  static_cast<unsigned>(st.st_mode & 07777), static_cast<unsigned>(0666 & ~forbidden_mode_bits),
                  forbidden_mode_bits == kPublicKeyForbiddenBits ? "644" : "600 or 640");
    return BadConfig(variable, path + " " + modes);
  }
  if (static_cast<uint64_t>(st.st_size) > kMaxProtectedFileBytes) {
    return BadConfig(variable, path + " is larger than " + std::to_string(kMaxProtectedFileBytes) + " bytes");
  }
  std::string text;
  char buf[4096];
  while (true) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      OPENSSL_cleanse(buf, sizeof(buf));
      return BadConfig(variable, "cannot read " + path + ": " + std::strerror(errno));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > kMaxProtectedFileBytes) {
      OPENSSL_cleanse(buf, sizeof(buf));
      OPENSSL_cleanse(text.data(), text.size());
      return BadConfig(variable, path + " is larger than " + std::to_string(kMaxProtectedFileBytes) + " bytes");
    }
  }
  OPENSSL_cleanse(buf, sizeof(buf));
  return text;
}

Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const EnvLookup& env,
                                                         EpochSecondsFn now) {
  switch (mode) {
    case AuthMode::kOff:
      return std::unique_ptr<Authenticator>();
    case AuthMode::kService:
      return MakeServiceAuthenticator(env);
    case AuthMode::kJwt:
      return MakeJwtAuthenticator(env, std::move(now));
  }
  return Internal("bad_auth_mode", "unknown CHATD_AUTH_MODE");
}

Result<std::unique_ptr<Authenticator>> MakeAuthenticator(AuthMode mode, const EnvLookup& env) {
  return MakeAuthenticator(mode, env, EpochSecondsFn());
}

}  // namespace chatd
