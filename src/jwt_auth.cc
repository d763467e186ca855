// JWT mode: each client presents a signed token; the user is its "sub"
// (docs/auth.md).
//
// JWTs are verified with OpenSSL directly rather than with Debian 12's libjwt
// 1.10, which takes the algorithm from the token's own header: here the
// algorithm and the key are fixed by configuration, so "alg":"none" or an
// HS256 token "signed" with the RS256 public key can never be accepted.
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/pem.h>
#include <rapidjson/document.h>

#include <cstddef>
#include <cstring>
#include <ctime>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "auth_internal.h"
#include "chatd/log.h"
#include "chatd/user_id.h"
#include "json_document.h"
#include "openssl_util.h"
#include "secret_file.h"
#include "secret_strength.h"

namespace chatd {

namespace {

// RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
constexpr size_t kMinHs256SecretBytes = 32;
constexpr int64_t kDefaultLeewayS = 30;
constexpr int64_t kMaxLeewayS = 600;
constexpr int kMinRsaBits = 2048;
constexpr size_t kEs256CoordinateBytes = 32;
// SEQUENCE of two INTEGERs of at most 33 bytes each.
constexpr size_t kMaxEs256DerBytes = 80;

// Iterative: no recursion on nesting. Encoding validated, as for request bodies.
constexpr unsigned kJsonParseFlags = rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag;

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

// A parsed JSON object; valid while the parser lives. A header and a payload
// of a few hundred bytes parse without touching the heap; larger ones (up to
// the token limit) spill to malloc.
class JsonObjectParser {
 public:
  // The root value when `text` is exactly one JSON object, else nullptr.
  const rapidjson::Value* Parse(std::string_view text) {
    doc_.Parse<kJsonParseFlags>(text.data(), text.size());
    if (doc_.HasParseError() || !doc_.IsObject()) return nullptr;
    return &doc_;
  }

 private:
  LocalJsonDocument doc_;
};

class JwtAuthenticator final : public Authenticator {
 public:
  JwtAuthenticator(JwtSettings settings, EpochSecondsFn now, EvpMdPtr sha256, EvpPkeyPtr key,
                   EvpMacCtxPtr hmac_template)
      : settings_(std::move(settings)),
        now_(std::move(now)),
        sha256_(std::move(sha256)),
        key_(std::move(key)),
        hmac_template_(std::move(hmac_template)) {}

  // A refusal is logged and counted by Observe (observe.h), from the
  // request's context.
  Result<Principal> Authenticate(const HttpRequest& req) override {
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
    Principal principal;
    if (sub->IsString()) principal.subject = UserId::Parse(AsView(*sub));
    if (!principal.subject) return Unauthorized("invalid_subject", "The token's subject is not a valid userId");
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

Result<std::string> ReadHs256Secret(const AuthConfig& config) {
  constexpr const char* kInline = "CHATD_JWT_SECRET";
  constexpr const char* kFile = "CHATD_JWT_SECRET_FILE";
  std::optional<std::string> inline_secret = config.jwt_secret;
  const std::optional<std::string>& file = config.jwt_secret_file;
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

Result<EvpPkeyPtr> ReadPublicKey(const AuthConfig& config, JwtAlgorithm algorithm) {
  constexpr const char* kFile = "CHATD_JWT_PUBLIC_KEY_FILE";
  const std::optional<std::string>& file = config.jwt_public_key_file;
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

Result<int64_t> ReadLeeway(const AuthConfig& config) {
  constexpr const char* kName = "CHATD_JWT_LEEWAY_S";
  const std::optional<std::string>& v = config.jwt_leeway_s;
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

}  // namespace

Result<std::unique_ptr<Authenticator>> MakeJwtAuthenticator(const AuthConfig& config, EpochSecondsFn now) {
  JwtSettings settings;
  const std::optional<std::string>& alg = config.jwt_algorithm;
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
  settings.issuer = config.jwt_issuer;
  settings.audience = config.jwt_audience;
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
  Result<int64_t> leeway = ReadLeeway(config);
  if (!leeway.ok()) return leeway.status();
  settings.leeway_s = *leeway;

  EvpMdPtr sha256(EVP_MD_fetch(nullptr, "SHA256", nullptr));
  if (!sha256) return Internal("digest_failed", "SHA-256 is not available in OpenSSL");

  // A key of the other family configured alongside is a mistake worth
  // stopping for: it is how HS/RS confusion starts.
  EvpPkeyPtr key;
  EvpMacCtxPtr hmac;
  if (settings.algorithm == JwtAlgorithm::kHs256) {
    if (config.jwt_public_key_file) {
      return BadConfig("CHATD_JWT_PUBLIC_KEY_FILE", "is for RS256 and ES256; HS256 uses CHATD_JWT_SECRET");
    }
    Result<std::string> secret = ReadHs256Secret(config);
    if (!secret.ok()) return secret.status();
    Result<EvpMacCtxPtr> made = MakeHmacTemplate(*secret);
    if (!made.ok()) return made.status();
    hmac = std::move(*made);
  } else {
    if (config.jwt_secret || config.jwt_secret_file) {
      return BadConfig("CHATD_JWT_SECRET", "(or CHATD_JWT_SECRET_FILE) is for HS256 only; " +
                                               std::string(settings.algorithm_name) +
                                               " uses CHATD_JWT_PUBLIC_KEY_FILE");
    }
    Result<EvpPkeyPtr> read = ReadPublicKey(config, settings.algorithm);
    if (!read.ok()) return read.status();
    key = std::move(*read);
  }
  if (!now) now = [] { return static_cast<int64_t>(std::time(nullptr)); };
  std::unique_ptr<Authenticator> auth = std::make_unique<JwtAuthenticator>(
      std::move(settings), std::move(now), std::move(sha256), std::move(key), std::move(hmac));
  return auth;
}

}  // namespace chatd
