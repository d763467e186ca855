// Access control without a server: bearer parsing, base64url, secret files,
// service tokens, and JWTs signed here with freshly generated keys (HS256,
// RS256, ES256), against every refusal of docs/auth.md.
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/test/unit_test.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "auth_internal.h"
#include "chatd/auth.h"
#include "secret_file.h"
#include "secret_strength.h"

using namespace chatd;

namespace {

constexpr int64_t kNow = 1'700'000'000;
constexpr int64_t kLeeway = 30;  // the default
const std::string kSecret = "Zq3vN8kT1pXw6RbL0mHc4YsG9dJf2UeA7oKi";  // random-looking: passes the strength rules
const std::string kOtherSecret = "fedcba9876543210fedcba9876543210-other-secret";
const std::string kServiceTokenA = "svcA-7Hq2Lm9Xc4Rt8Vb1Nz6K";
const std::string kServiceTokenB = "svcB-3Pw8Df5Jy0Gs7Ku2Ma9E";

using Vars = std::map<std::string, std::string>;

EnvLookup Env(Vars vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

// ---- A tiny JWS signer, independent of the code under test -----------------

std::string B64Url(std::string_view bytes) {
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    for (int k = 3; k >= 0; --k) out.push_back(kAlphabet[(v >> (6 * k)) & 63]);
  }
  if (bytes.size() - i == 1) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    out.push_back(kAlphabet[(v >> 18) & 63]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
  } else if (bytes.size() - i == 2) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8);
    out.push_back(kAlphabet[(v >> 18) & 63]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(kAlphabet[(v >> 6) & 63]);
  }
  return out;
}

std::string Hmac(const std::string& key, std::string_view data) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()),
       data.size(), mac, &len);
  return std::string(reinterpret_cast<char*>(mac), len);
}

// PKCS#1 v1.5 for RSA, DER for EC: what OpenSSL produces.
std::string SignSha256(EVP_PKEY* key, std::string_view data) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  size_t len = 0;
  BOOST_REQUIRE(EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key) == 1);
  BOOST_REQUIRE(EVP_DigestSign(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(data.data()),
                               data.size()) == 1);
  std::string sig(len, '\0');
  BOOST_REQUIRE(EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(sig.data()), &len,
                               reinterpret_cast<const unsigned char*>(data.data()), data.size()) == 1);
  EVP_MD_CTX_free(ctx);
  sig.resize(len);
  return sig;
}

// JOSE's r||s from OpenSSL's DER.
std::string DerToRaw(const std::string& der) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size()));
  BOOST_REQUIRE(sig != nullptr);
  std::string raw(64, '\0');
  BN_bn2binpad(ECDSA_SIG_get0_r(sig), reinterpret_cast<unsigned char*>(raw.data()), 32);
  BN_bn2binpad(ECDSA_SIG_get0_s(sig), reinterpret_cast<unsigned char*>(raw.data()) + 32, 32);
  ECDSA_SIG_free(sig);
  return raw;
}

enum class Alg { kHs256, kRs256, kEs256 };

struct Signer {
  Alg alg = Alg::kHs256;
  std::string secret = kSecret;  // HS256
  EVP_PKEY* key = nullptr;       // RS256, ES256

  std::string Sign(std::string_view input) const {
    switch (alg) {
      case Alg::kHs256:
        return Hmac(secret, input);
      case Alg::kRs256:
        return SignSha256(key, input);
      case Alg::kEs256:
        return DerToRaw(SignSha256(key, input));
    }
    return "";
  }
};

std::string Jws(std::string_view header_json, std::string_view payload_json, const Signer& signer) {
  std::string input = B64Url(header_json) + "." + B64Url(payload_json);
  return input + "." + B64Url(signer.Sign(input));
}

const char* AlgName(Alg alg) {
  return alg == Alg::kHs256 ? "HS256" : alg == Alg::kRs256 ? "RS256" : "ES256";
}

std::string Header(Alg alg) { return std::string("{\"alg\":\"") + AlgName(alg) + "\",\"typ\":\"JWT\"}"; }

std::string Claims(const std::string& sub, int64_t exp, const std::string& extra = "") {
  return "{\"sub\":\"" + sub + "\",\"exp\":" + std::to_string(exp) + extra + "}";
}

// ---- Keys and files --------------------------------------------------------

struct Keys {
  Pkey rsa{EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048})};
  Pkey rsa_other{EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048})};
  Pkey rsa_short{EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{1024})};
  Pkey ec{EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")};
  Pkey ec_other{EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")};
  Pkey ec_p384{EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-384")};
};

const Keys& TestKeys() {
  static const Keys keys;  // RSA key generation is slow: once per run
  BOOST_REQUIRE(keys.rsa && keys.rsa_other && keys.rsa_short && keys.ec && keys.ec_other && keys.ec_p384);
  return keys;
}

std::string PublicPem(EVP_PKEY* key) {
  BIO* bio = BIO_new(BIO_s_mem());
  BOOST_REQUIRE(PEM_write_bio_PUBKEY(bio, key) == 1);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(len));
  BIO_free(bio);
  return pem;
}

class TempDir {
 public:
  TempDir() {
    std::string templ = (std::filesystem::temp_directory_path() / "chatd-auth-test-XXXXXX").string();
    BOOST_REQUIRE(mkdtemp(templ.data()) != nullptr);
    path_ = templ;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  // Writes `content` to a new file with `mode` (chmod, so the umask does not interfere).
  std::string Write(const std::string& name, const std::string& content, mode_t mode) const {
    std::string path = (path_ / name).string();
    ::unlink(path.c_str());  // a previous read-only file of that name
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << content;
    }
    BOOST_REQUIRE(::chmod(path.c_str(), mode) == 0);
    return path;
  }
  std::string Path(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

std::unique_ptr<Authenticator> MustMake(AuthMode mode, Vars vars) {
  auto made = MakeAuthenticator(mode, Env(std::move(vars)), [] { return kNow; });
  BOOST_REQUIRE_MESSAGE(made.ok(), made.status().message());
  BOOST_REQUIRE(*made != nullptr);
  return std::move(*made);
}

Status ConfigError(AuthMode mode, Vars vars) {
  auto made = MakeAuthenticator(mode, Env(std::move(vars)), [] { return kNow; });
  BOOST_REQUIRE(!made.ok());
  BOOST_TEST(made.status().reason() == "bad_config");
  BOOST_TEST((made.status().code() == Code::kInvalidArgument));
  return made.status();
}

bool Mentions(const Status& s, const std::string& text) { return s.message().find(text) != std::string::npos; }

HttpRequest WithAuthorization(std::string value) {
  HttpRequest req;
  req.method = "POST";
  req.path = "/api/chat";
  req.authorization = std::move(value);
  req.request_id = "rid";
  return req;
}

// The reason of a refusal, or "ok:<subject>" (empty subject for service mode).
std::string Outcome(Authenticator& auth, const std::string& token) {
  Result<Principal> who = auth.Authenticate(WithAuthorization("Bearer " + token));
  if (who.ok()) return "ok:" + (who->subject ? who->subject->str() : std::string());
  BOOST_TEST((who.status().code() == Code::kUnauthorized));
  BOOST_TEST(who.status().message().find(token) == std::string::npos);
  return who.status().reason();
}

Vars Hs256Vars(Vars extra = {}) {
  Vars v{{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET", kSecret}};
  v.insert(extra.begin(), extra.end());
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(auth_building_blocks)

BOOST_AUTO_TEST_CASE(bearer_header_must_be_exactly_scheme_and_one_token) {
  auto reason = [](const std::string& value) {
    Result<std::string_view> t = BearerToken(value);
    return t.ok() ? "ok:" + std::string(*t) : t.status().reason();
  };
  BOOST_TEST(reason("") == "missing_token");
  BOOST_TEST(reason("Bearer abc.def-_~+/") == "ok:abc.def-_~+/");
  BOOST_TEST(reason("bearer abc") == "ok:abc");
  BOOST_TEST(reason("BEARER abc") == "ok:abc");
  BOOST_TEST(reason("Bearer    abc") == "ok:abc");
  BOOST_TEST(reason("Bearer abc==") == "ok:abc==");
  BOOST_TEST(reason("Basic YWxpY2U6cHc=") == "bad_auth_scheme");
  BOOST_TEST(reason("Bearerabc") == "bad_auth_scheme");
  BOOST_TEST(reason("Bearer") == "bad_auth_scheme");
  BOOST_TEST(reason("Bearer\tabc") == "bad_auth_scheme");
  BOOST_TEST(reason(" Bearer abc") == "bad_auth_scheme");
  BOOST_TEST(reason("Bearer ") == "malformed_token");
  BOOST_TEST(reason("Bearer abc def") == "malformed_token");
  BOOST_TEST(reason("Bearer abc, Bearer def") == "malformed_token");
  BOOST_TEST(reason("Bearer abc ") == "malformed_token");
  BOOST_TEST(reason("Bearer a=b") == "malformed_token");
  BOOST_TEST(reason("Bearer ===") == "malformed_token");
  BOOST_TEST(reason(std::string("Bearer ab\0c", 11)) == "malformed_token");
  BOOST_TEST(reason("Bearer " + std::string(kMaxBearerTokenBytes, 'a')) ==
             "ok:" + std::string(kMaxBearerTokenBytes, 'a'));
  BOOST_TEST(reason("Bearer " + std::string(kMaxBearerTokenBytes + 1, 'a')) == "token_too_long");
  BOOST_TEST(reason("Bearer " + std::string(1 << 20, 'a')) == "token_too_long");
}

BOOST_AUTO_TEST_CASE(base64url_is_strict) {
  std::string out = "stale";
  BOOST_TEST(Base64UrlDecode("", out));
  BOOST_TEST(out.empty());
  BOOST_TEST(Base64UrlDecode("QQ", out));
  BOOST_TEST(out == "A");
  BOOST_TEST(Base64UrlDecode("QUI", out));
  BOOST_TEST(out == "AB");
  BOOST_TEST(Base64UrlDecode("QUJD", out));
  BOOST_TEST(out == "ABC");
  BOOST_TEST(Base64UrlDecode("-w", out));
  BOOST_TEST(out == "\xfb");
  BOOST_TEST(Base64UrlDecode("_-8", out));
  BOOST_TEST(out == "\xff\xef");
  BOOST_TEST(!Base64UrlDecode("QQ==", out));  // JWS forbids padding
  BOOST_TEST(!Base64UrlDecode("+w", out));    // base64, not base64url
  BOOST_TEST(!Base64UrlDecode("/w", out));
  BOOST_TEST(!Base64UrlDecode("Q", out));     // 6 bits: no byte
  BOOST_TEST(!Base64UrlDecode("QUJDR", out));
  BOOST_TEST(!Base64UrlDecode("QR", out));    // stray low bits: a second encoding of "A"
  BOOST_TEST(!Base64UrlDecode("QUJ", out));
  BOOST_TEST(!Base64UrlDecode("QU.D", out));
  BOOST_TEST(!Base64UrlDecode(std::string_view("QU\0D", 4), out));
  // Round trip over every byte value.
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  for (size_t n = 0; n <= all.size(); n += 37) {
    BOOST_TEST(Base64UrlDecode(B64Url(all.substr(0, n)), out));
    BOOST_TEST(out == all.substr(0, n));
  }
}

BOOST_AUTO_TEST_CASE(protected_file_mode_is_checked) {
  TempDir dir;
  const std::string secret = "the-file-secret-content";
  for (mode_t ok_mode : {0400, 0600, 0640, 0440}) {
    auto read = ReadProtectedFile(dir.Write("ok", secret, ok_mode), "VAR_FILE", 0027);
    BOOST_REQUIRE_MESSAGE(read.ok(), read.status().message());
    BOOST_TEST(*read == secret);
  }
  for (mode_t bad_mode : {0644, 0604, 0660, 0620, 0602, 0666, 0777}) {
    auto read = ReadProtectedFile(dir.Write("bad", secret, bad_mode), "VAR_FILE", 0027);
    BOOST_REQUIRE(!read.ok());
    BOOST_TEST(read.status().reason() == "bad_config");
    BOOST_TEST(Mentions(read.status(), "VAR_FILE"));
    BOOST_TEST(Mentions(read.status(), "0640"));
    BOOST_TEST(!Mentions(read.status(), secret));
  }
  // A public key may be world-readable, never writable by others.
  BOOST_TEST(ReadProtectedFile(dir.Write("pub", "k", 0644), "KEY_FILE", 0022).ok());
  BOOST_TEST(!ReadProtectedFile(dir.Write("pub", "k", 0664), "KEY_FILE", 0022).ok());
  BOOST_TEST(!ReadProtectedFile(dir.Write("pub", "k", 0646), "KEY_FILE", 0022).ok());

  auto missing = ReadProtectedFile(dir.Path("nope"), "VAR_FILE", 0027);
  BOOST_REQUIRE(!missing.ok());
  BOOST_TEST(Mentions(missing.status(), "VAR_FILE"));
  auto folder = ReadProtectedFile(dir.Path(""), "VAR_FILE", 0027);
  BOOST_REQUIRE(!folder.ok());
  BOOST_TEST(Mentions(folder.status(), "not a regular file"));
  auto huge = ReadProtectedFile(dir.Write("huge", std::string(70 * 1024, 'x'), 0600), "VAR_FILE", 0027);
  BOOST_TEST(!huge.ok());
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(auth_config)

BOOST_AUTO_TEST_CASE(mode_off_builds_nothing) {
  auto made = MakeAuthenticator(AuthMode::kOff, Env({}));
  BOOST_REQUIRE(made.ok());
  BOOST_TEST((*made == nullptr));
}

BOOST_AUTO_TEST_CASE(jwt_is_the_default_and_refuses_to_start_unconfigured) {
  Status s = ConfigError(AuthMode::kJwt, {});
  BOOST_TEST(Mentions(s, "CHATD_JWT_ALGORITHM"));
  BOOST_TEST(Mentions(s, "CHATD_AUTH_MODE"));
  for (const char* bad : {"none", "hs256", "HS384", "PS256", "RS256,HS256"}) {
    BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", bad}}), "CHATD_JWT_ALGORITHM"));
  }
}

BOOST_AUTO_TEST_CASE(hs256_secret_rules) {
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}}), "CHATD_JWT_SECRET"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET", ""}}),
                      "CHATD_JWT_SECRET"));
  const std::string short_secret(31, 's');
  Status s = ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET", short_secret}});
  BOOST_TEST(Mentions(s, "CHATD_JWT_SECRET"));
  BOOST_TEST(Mentions(s, "32"));
  BOOST_TEST(!Mentions(s, short_secret));
  MustMake(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET", kSecret.substr(0, 32)}});

  TempDir dir;
  std::string file = dir.Write("secret", kSecret + "\n", 0600);
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, Hs256Vars({{"CHATD_JWT_SECRET_FILE", file}})), "both"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, Hs256Vars({{"CHATD_JWT_PUBLIC_KEY_FILE", file}})),
                      "CHATD_JWT_PUBLIC_KEY_FILE"));
  // The file's final newline is not part of the key.
  auto auth = MustMake(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET_FILE", file}});
  BOOST_TEST(Outcome(*auth, Jws(Header(Alg::kHs256), Claims("alice", kNow + 60), Signer{})) == "ok:alice");

  std::string loose = dir.Write("loose", kSecret, 0644);
  Status mode = ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET_FILE", loose}});
  BOOST_TEST(Mentions(mode, "CHATD_JWT_SECRET_FILE"));
  BOOST_TEST(!Mentions(mode, kSecret));
  std::string short_file = dir.Write("short", short_secret + "\n", 0600);
  BOOST_TEST(Mentions(
      ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET_FILE", short_file}}),
      "CHATD_JWT_SECRET_FILE"));
}

BOOST_AUTO_TEST_CASE(public_key_rules) {
  const Keys& keys = TestKeys();
  TempDir dir;
  std::string rsa = dir.Write("rsa.pem", PublicPem(keys.rsa.get()), 0600);
  std::string rsa_short = dir.Write("rsa1024.pem", PublicPem(keys.rsa_short.get()), 0644);
  std::string ec = dir.Write("ec.pem", PublicPem(keys.ec.get()), 0644);
  std::string p384 = dir.Write("p384.pem", PublicPem(keys.ec_p384.get()), 0644);
  std::string garbage = dir.Write("garbage.pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", 0644);
  std::string writable = dir.Write("writable.pem", PublicPem(keys.rsa.get()), 0666);

  auto with = [](const char* alg, const std::string& file) {
    return Vars{{"CHATD_JWT_ALGORITHM", alg}, {"CHATD_JWT_PUBLIC_KEY_FILE", file}};
  };
  MustMake(AuthMode::kJwt, with("RS256", rsa));
  MustMake(AuthMode::kJwt, with("ES256", ec));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "RS256"}}), "CHATD_JWT_PUBLIC_KEY_FILE"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, with("RS256", ec)), "RSA"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, with("RS256", rsa_short)), "2048"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, with("ES256", rsa)), "P-256"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, with("ES256", p384)), "P-256"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, with("RS256", garbage)), "PEM"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, with("RS256", writable)), "CHATD_JWT_PUBLIC_KEY_FILE"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, with("RS256", dir.Path("missing.pem"))),
                      "CHATD_JWT_PUBLIC_KEY_FILE"));
  // A shared secret next to a public key is how HS/RS confusion starts.
  Vars both = with("RS256", rsa);
  both["CHATD_JWT_SECRET"] = kSecret;
  Status s = ConfigError(AuthMode::kJwt, both);
  BOOST_TEST(Mentions(s, "CHATD_JWT_SECRET"));
  BOOST_TEST(!Mentions(s, kSecret));
}

BOOST_AUTO_TEST_CASE(leeway_is_bounded) {
  for (const char* bad : {"-1", "abc", "601", "1.5", "99999999999999999999999"}) {
    BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, Hs256Vars({{"CHATD_JWT_LEEWAY_S", bad}})), "CHATD_JWT_LEEWAY_S"));
  }
  MustMake(AuthMode::kJwt, Hs256Vars({{"CHATD_JWT_LEEWAY_S", "0"}}));
  MustMake(AuthMode::kJwt, Hs256Vars({{"CHATD_JWT_LEEWAY_S", "600"}}));
}

// Issue 12: the example file's CHATD_JWT_SECRET was accepted because only
// its length was checked.
BOOST_AUTO_TEST_CASE(placeholder_jwt_secret_from_the_example_is_refused) {
  const std::string placeholder = "replace-with-at-least-32-random-bytes-0000";
  Status s = ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET", placeholder}});
  BOOST_TEST(Mentions(s, "CHATD_JWT_SECRET"));
  BOOST_TEST(Mentions(s, "placeholder"));
  BOOST_TEST(!Mentions(s, placeholder));
  const std::vector<std::string> placeholders = {"CHANGEME-" + kSecret, kSecret + "-example", "my-Secret-" + kSecret,
                                                 kSecret + "password"};
  for (const std::string& bad : placeholders) {
    BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET", bad}}),
                        "placeholder"),
               bad);
  }
}

BOOST_AUTO_TEST_CASE(low_entropy_jwt_secret_is_refused_naming_the_variable) {
  // Too few distinct bytes, a run of repeats, a counting run; each 32+ bytes.
  const std::vector<std::string> weak_secrets = {
      std::string(32, 's'), "abababababababababababababababab", "Zq3vN8kT1pXw6RbL0mHc" + std::string(12, 'x'),
      "Zq3vN8kT1pXw6RbL0mHc4YsG12345678", "hgfedcbaZq3vN8kT1pXw6RbL0mHc4YsG"};
  for (const std::string& weak : weak_secrets) {
    Status s = ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET", weak}});
    BOOST_TEST(Mentions(s, "CHATD_JWT_SECRET"), weak);
    BOOST_TEST(!Mentions(s, weak), weak);
  }
  // The same rules for a secret read from a file, which the error names.
  TempDir dir;
  std::string file = dir.Write("weak", std::string(40, 'k') + "\n", 0600);
  BOOST_TEST(Mentions(ConfigError(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "HS256"}, {"CHATD_JWT_SECRET_FILE", file}}),
                      "CHATD_JWT_SECRET_FILE"));
}

BOOST_AUTO_TEST_CASE(secret_strength_rules_accept_random_values) {
  BOOST_TEST(!SecretWeakness(kSecret).has_value());
  BOOST_TEST(!SecretWeakness("3f9c2a71d8e04b6f5a1c9e7d2b8f4a60c3e1d7b9a5f2c8e6d4b0a7f3c1e9d5b2").has_value());
  BOOST_TEST(!SecretWeakness("1234567" + kSecret).has_value());  // a run of 7 is allowed
  BOOST_TEST(SecretWeakness("12345678" + kSecret).has_value());
  BOOST_TEST(SecretWeakness("abcdefghij").has_value());
  BOOST_TEST(SecretWeakness("0123456789").has_value());
}

BOOST_AUTO_TEST_CASE(placeholder_service_token_is_refused) {
  Status s = ConfigError(AuthMode::kService, {{"CHATD_SERVICE_TOKENS", kServiceTokenA + ",my-service-token-example"}});
  BOOST_TEST(Mentions(s, "CHATD_SERVICE_TOKENS"));
  BOOST_TEST(Mentions(s, "entry 2"));
  BOOST_TEST(!Mentions(s, "my-service-token-example"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kService, {{"CHATD_SERVICE_TOKENS", std::string(24, 'a')}}), "entry 1"));
}

BOOST_AUTO_TEST_CASE(service_token_rules) {
  Status none = ConfigError(AuthMode::kService, {});
  BOOST_TEST(Mentions(none, "CHATD_SERVICE_TOKENS"));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kService, {{"CHATD_SERVICE_TOKENS", " , ,"}}), "no token"));
  const std::string weak = "short-token";
  Status s = ConfigError(AuthMode::kService, {{"CHATD_SERVICE_TOKENS", kServiceTokenA + "," + weak}});
  BOOST_TEST(Mentions(s, "CHATD_SERVICE_TOKENS"));
  BOOST_TEST(Mentions(s, "entry 2"));
  BOOST_TEST(!Mentions(s, weak));
  BOOST_TEST(!Mentions(s, kServiceTokenA));
  BOOST_TEST(Mentions(ConfigError(AuthMode::kService, {{"CHATD_SERVICE_TOKENS", "token with spaces in it!"}}),
                      "entry 1"));

  TempDir dir;
  std::string file = dir.Write("tokens", "# one per line\n\n  " + kServiceTokenA + "  \n" + kServiceTokenB + "\r\n",
                               0640);
  BOOST_TEST(Mentions(ConfigError(AuthMode::kService,
                                  {{"CHATD_SERVICE_TOKENS", kServiceTokenA}, {"CHATD_SERVICE_TOKENS_FILE", file}}),
                      "both"));
  auto auth = MustMake(AuthMode::kService, {{"CHATD_SERVICE_TOKENS_FILE", file}});
  BOOST_TEST(Outcome(*auth, kServiceTokenA) == "ok:");
  BOOST_TEST(Outcome(*auth, kServiceTokenB) == "ok:");
  BOOST_TEST(Outcome(*auth, "#-one-per-line-aaaaaa") == "malformed_token");

  std::string loose = dir.Write("loose", kServiceTokenA + "\n", 0604);
  Status mode = ConfigError(AuthMode::kService, {{"CHATD_SERVICE_TOKENS_FILE", loose}});
  BOOST_TEST(Mentions(mode, "CHATD_SERVICE_TOKENS_FILE"));
  BOOST_TEST(!Mentions(mode, kServiceTokenA));
  std::string comments = dir.Write("comments", "# nothing here\n\n", 0600);
  BOOST_TEST(Mentions(ConfigError(AuthMode::kService, {{"CHATD_SERVICE_TOKENS_FILE", comments}}), "no token"));
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(auth_service)

BOOST_AUTO_TEST_CASE(only_a_configured_token_passes) {
  auto auth = MustMake(AuthMode::kService, {{"CHATD_SERVICE_TOKENS", kServiceTokenA + ", " + kServiceTokenB}});
  Result<Principal> ok = auth->Authenticate(WithAuthorization("Bearer " + kServiceTokenB));
  BOOST_REQUIRE(ok.ok());
  BOOST_TEST(!ok->subject.has_value());  // the body's userId is trusted
  BOOST_TEST(Outcome(*auth, kServiceTokenA) == "ok:");
  BOOST_TEST(Outcome(*auth, kServiceTokenA.substr(0, kServiceTokenA.size() - 1)) == "invalid_token");
  BOOST_TEST(Outcome(*auth, kServiceTokenA + "a") == "invalid_token");
  BOOST_TEST(Outcome(*auth, "SVC-TOKEN-AAAAAAAAAAAAAAAAAAAAAAAA") == "invalid_token");
  BOOST_TEST(Outcome(*auth, kServiceTokenA + "," + kServiceTokenB) == "malformed_token");
  BOOST_TEST(auth->Authenticate(WithAuthorization("")).status().reason() == "missing_token");
  BOOST_TEST(auth->Authenticate(WithAuthorization("Basic " + kServiceTokenA)).status().reason() ==
             "bad_auth_scheme");
  BOOST_TEST(auth->Authenticate(WithAuthorization("bearer " + kServiceTokenA)).ok());
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(auth_jwt)

BOOST_AUTO_TEST_CASE(each_algorithm_accepts_its_own_tokens_only) {
  const Keys& keys = TestKeys();
  TempDir dir;
  std::string rsa = dir.Write("rsa.pem", PublicPem(keys.rsa.get()), 0644);
  std::string ec = dir.Write("ec.pem", PublicPem(keys.ec.get()), 0644);
  auto hs = MustMake(AuthMode::kJwt, Hs256Vars());
  auto rs = MustMake(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "RS256"}, {"CHATD_JWT_PUBLIC_KEY_FILE", rsa}});
  auto es = MustMake(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "ES256"}, {"CHATD_JWT_PUBLIC_KEY_FILE", ec}});

  Signer hs_signer{Alg::kHs256, kSecret, nullptr};
  Signer rs_signer{Alg::kRs256, "", keys.rsa.get()};
  Signer es_signer{Alg::kEs256, "", keys.ec.get()};
  const std::string claims = Claims("alice", kNow + 600);
  std::string hs_token = Jws(Header(Alg::kHs256), claims, hs_signer);
  std::string rs_token = Jws(Header(Alg::kRs256), claims, rs_signer);
  std::string es_token = Jws(Header(Alg::kEs256), claims, es_signer);

  BOOST_TEST(Outcome(*hs, hs_token) == "ok:alice");
  BOOST_TEST(Outcome(*rs, rs_token) == "ok:alice");
  BOOST_TEST(Outcome(*es, es_token) == "ok:alice");
  for (const std::string& t : {rs_token, es_token}) BOOST_TEST(Outcome(*hs, t) == "wrong_algorithm");
  for (const std::string& t : {hs_token, es_token}) BOOST_TEST(Outcome(*rs, t) == "wrong_algorithm");
  for (const std::string& t : {hs_token, rs_token}) BOOST_TEST(Outcome(*es, t) == "wrong_algorithm");

  // Same algorithm, another key.
  BOOST_TEST(Outcome(*hs, Jws(Header(Alg::kHs256), claims, Signer{Alg::kHs256, kOtherSecret, nullptr})) ==
             "bad_signature");
  BOOST_TEST(Outcome(*rs, Jws(Header(Alg::kRs256), claims, Signer{Alg::kRs256, "", keys.rsa_other.get()})) ==
             "bad_signature");
  BOOST_TEST(Outcome(*es, Jws(Header(Alg::kEs256), claims, Signer{Alg::kEs256, "", keys.ec_other.get()})) ==
             "bad_signature");
  // ES256 in OpenSSL's DER form instead of JOSE's r||s.
  std::string input = B64Url(Header(Alg::kEs256)) + "." + B64Url(claims);
  BOOST_TEST(Outcome(*es, input + "." + B64Url(SignSha256(keys.ec.get(), input))) == "bad_signature");
}

BOOST_AUTO_TEST_CASE(algorithm_confusion_is_refused) {
  const Keys& keys = TestKeys();
  TempDir dir;
  std::string pem = PublicPem(keys.rsa.get());
  std::string rsa = dir.Write("rsa.pem", pem, 0644);
  auto rs = MustMake(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "RS256"}, {"CHATD_JWT_PUBLIC_KEY_FILE", rsa}});
  auto hs = MustMake(AuthMode::kJwt, Hs256Vars());
  const std::string claims = Claims("alice", kNow + 600);

  // The classic: HS256 "signed" with the RS256 public key as the secret.
  BOOST_TEST(Outcome(*rs, Jws(Header(Alg::kHs256), claims, Signer{Alg::kHs256, pem, nullptr})) ==
             "wrong_algorithm");
  // alg none, with and without a signature.
  std::string none_input = B64Url("{\"alg\":\"none\",\"typ\":\"JWT\"}") + "." + B64Url(claims);
  for (auto* auth : {rs.get(), hs.get()}) {
    BOOST_TEST(Outcome(*auth, none_input + ".") == "wrong_algorithm");
    BOOST_TEST(Outcome(*auth, none_input + "." + B64Url(Hmac(kSecret, none_input))) == "wrong_algorithm");
  }
  // The header's alg must be the configured one exactly, even when the signature is right.
  Signer hs_signer;
  for (const char* header : {"{\"alg\":\"hs256\"}", "{\"alg\":\"HS256 \"}", "{\"alg\":\"HS512\"}", "{\"typ\":\"JWT\"}",
                             "{\"alg\":null}", "{\"alg\":256}", "{\"alg\":[\"HS256\"]}"}) {
    BOOST_TEST(Outcome(*hs, Jws(header, claims, hs_signer)) == "wrong_algorithm", header);
  }
  BOOST_TEST(Outcome(*hs, Jws("{\"alg\":\"HS256\"}", claims, hs_signer)) == "ok:alice");
  // Duplicate alg: parsers disagree on which one counts.
  BOOST_TEST(Outcome(*hs, Jws("{\"alg\":\"none\",\"alg\":\"HS256\"}", claims, hs_signer)) == "malformed_token");
  BOOST_TEST(Outcome(*hs, Jws("{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}", claims, hs_signer)) ==
             "unsupported_header");
}

BOOST_AUTO_TEST_CASE(expiry_and_not_before_with_leeway) {
  auto hs = MustMake(AuthMode::kJwt, Hs256Vars());
  Signer s;
  auto token = [&](const std::string& payload) { return Jws(Header(Alg::kHs256), payload, s); };
  BOOST_TEST(Outcome(*hs, token("{\"sub\":\"alice\"}")) == "missing_expiry");
  BOOST_TEST(Outcome(*hs, token("{\"sub\":\"alice\",\"exp\":\"" + std::to_string(kNow + 60) + "\"}")) ==
             "missing_expiry");
  BOOST_TEST(Outcome(*hs, token("{\"sub\":\"alice\",\"exp\":null}")) == "missing_expiry");
  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow - kLeeway + 1))) == "ok:alice");
  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow - kLeeway))) == "token_expired");
  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow - 86400))) == "token_expired");
  BOOST_TEST(Outcome(*hs, token("{\"sub\":\"alice\",\"exp\":" + std::to_string(kNow) + ".5e0}")) == "ok:alice");
  BOOST_TEST(Outcome(*hs, token("{\"sub\":\"alice\",\"exp\":-1}")) == "token_expired");

  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow + 600, ",\"nbf\":" + std::to_string(kNow + kLeeway)))) ==
             "ok:alice");
  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow + 600, ",\"nbf\":" + std::to_string(kNow + kLeeway + 1)))) ==
             "token_not_yet_valid");
  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow + 600, ",\"nbf\":\"soon\""))) == "malformed_token");
  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow + 600, ",\"iat\":\"now\""))) == "malformed_token");
  BOOST_TEST(Outcome(*hs, token(Claims("alice", kNow + 600, ",\"iat\":" + std::to_string(kNow)))) == "ok:alice");

  auto strict = MustMake(AuthMode::kJwt, Hs256Vars({{"CHATD_JWT_LEEWAY_S", "0"}}));
  BOOST_TEST(Outcome(*strict, token(Claims("alice", kNow + 1))) == "ok:alice");
  BOOST_TEST(Outcome(*strict, token(Claims("alice", kNow))) == "token_expired");
}

BOOST_AUTO_TEST_CASE(issuer_and_audience_when_configured) {
  auto checked = MustMake(AuthMode::kJwt, Hs256Vars({{"CHATD_JWT_ISSUER", "https://idp.example"},
                                                     {"CHATD_JWT_AUDIENCE", "chatd"}}));
  auto open = MustMake(AuthMode::kJwt, Hs256Vars());
  Signer s;
  auto token = [&](const std::string& extra) { return Jws(Header(Alg::kHs256), Claims("bob", kNow + 60, extra), s); };
  const std::string iss = ",\"iss\":\"https://idp.example\"";
  BOOST_TEST(Outcome(*checked, token(iss + ",\"aud\":\"chatd\"")) == "ok:bob");
  BOOST_TEST(Outcome(*checked, token(iss + ",\"aud\":[\"other\",\"chatd\"]")) == "ok:bob");
  BOOST_TEST(Outcome(*checked, token(iss + ",\"aud\":[\"other\"]")) == "wrong_audience");
  BOOST_TEST(Outcome(*checked, token(iss + ",\"aud\":[]")) == "wrong_audience");
  BOOST_TEST(Outcome(*checked, token(iss + ",\"aud\":[\"chatd\",7]")) == "wrong_audience");
  BOOST_TEST(Outcome(*checked, token(iss + ",\"aud\":\"CHATD\"")) == "wrong_audience");
  BOOST_TEST(Outcome(*checked, token(iss + ",\"aud\":{\"x\":\"chatd\"}")) == "wrong_audience");
  BOOST_TEST(Outcome(*checked, token(iss)) == "wrong_audience");
  BOOST_TEST(Outcome(*checked, token(",\"aud\":\"chatd\"")) == "wrong_issuer");
  BOOST_TEST(Outcome(*checked, token(",\"iss\":\"https://evil.example\",\"aud\":\"chatd\"")) == "wrong_issuer");
  BOOST_TEST(Outcome(*checked, token(",\"iss\":[\"https://idp.example\"],\"aud\":\"chatd\"")) == "wrong_issuer");
  // Unconfigured: iss is not checked, but a token addressed to someone else is refused.
  BOOST_TEST(Outcome(*open, token(",\"iss\":\"anyone\"")) == "ok:bob");
  BOOST_TEST(Outcome(*open, token(",\"aud\":\"another-service\"")) == "wrong_audience");
}

BOOST_AUTO_TEST_CASE(subject_must_be_a_valid_user_id_verbatim) {
  auto hs = MustMake(AuthMode::kJwt, Hs256Vars());
  Signer s;
  auto token = [&](const std::string& payload) { return Jws(Header(Alg::kHs256), payload, s); };
  const std::string exp = std::to_string(kNow + 60);
  BOOST_TEST(Outcome(*hs, token("{\"exp\":" + exp + "}")) == "missing_subject");
  BOOST_TEST(Outcome(*hs, token(Claims("Alice", kNow + 60))) == "ok:Alice");
  BOOST_TEST(Outcome(*hs, token(Claims("a.b-c_d@e", kNow + 60))) == "ok:a.b-c_d@e");
  BOOST_TEST(Outcome(*hs, token(Claims(std::string(64, 'u'), kNow + 60))) == "ok:" + std::string(64, 'u'));
  for (const std::string& bad : {std::string(""), std::string("a b"), std::string("a{b}"), std::string(65, 'u'),
                                 std::string("caf\\u00e9"), std::string("alice\\u0000")}) {
    BOOST_TEST(Outcome(*hs, token(Claims(bad, kNow + 60))) == "invalid_subject", bad);
  }
  BOOST_TEST(Outcome(*hs, token("{\"sub\":42,\"exp\":" + exp + "}")) == "invalid_subject");
  BOOST_TEST(Outcome(*hs, token("{\"sub\":null,\"exp\":" + exp + "}")) == "invalid_subject");
  BOOST_TEST(Outcome(*hs, token("{\"sub\":\"bob\",\"sub\":\"alice\",\"exp\":" + exp + "}")) == "malformed_token");
}

BOOST_AUTO_TEST_CASE(malformed_tokens) {
  auto hs = MustMake(AuthMode::kJwt, Hs256Vars());
  Signer s;
  std::string good = Jws(Header(Alg::kHs256), Claims("alice", kNow + 60), s);
  size_t dot1 = good.find('.'), dot2 = good.rfind('.');
  BOOST_TEST(Outcome(*hs, good) == "ok:alice");
  BOOST_TEST(Outcome(*hs, good.substr(0, dot2)) == "malformed_token");  // two segments
  BOOST_TEST(Outcome(*hs, good + ".") == "malformed_token");             // four
  BOOST_TEST(Outcome(*hs, good + "." + good) == "malformed_token");
  BOOST_TEST(Outcome(*hs, "..") == "malformed_token");
  BOOST_TEST(Outcome(*hs, "abc") == "malformed_token");
  std::string plus = good;
  plus[dot1 + 1] = '+';
  BOOST_TEST(Outcome(*hs, plus) == "malformed_token");
  BOOST_TEST(Outcome(*hs, good + "==") == "malformed_token");  // padded signature
  // Tampering with any part breaks the signature.
  std::string other_payload = B64Url(Claims("bob", kNow + 60));
  BOOST_TEST(Outcome(*hs, good.substr(0, dot1 + 1) + other_payload + good.substr(dot2)) == "bad_signature");
  std::string flipped = good;
  flipped[dot2 + 3] = flipped[dot2 + 3] == 'A' ? 'B' : 'A';
  BOOST_TEST(Outcome(*hs, flipped) == "bad_signature");
  BOOST_TEST(Outcome(*hs, good.substr(0, dot2 + 1)) == "bad_signature");  // empty signature
  // Signed, but not JSON objects.
  for (const char* header : {"", "[]", "\"HS256\"", "{\"alg\":\"HS256\"} x", "{\"alg\":\"HS256\""}) {
    BOOST_TEST(Outcome(*hs, Jws(header, Claims("alice", kNow + 60), s)) == "malformed_token", header);
  }
  for (const char* payload : {"", "[]", "null", "{\"sub\":\"alice\"", "{\"sub\":\"\xff\",\"exp\":1}"}) {
    BOOST_TEST(Outcome(*hs, Jws(Header(Alg::kHs256), payload, s)) == "malformed_token", payload);
  }
  std::string deep = std::string(2500, '[') + std::string(2500, ']');
  BOOST_TEST(Outcome(*hs, Jws(Header(Alg::kHs256), "{\"x\":" + deep + ",\"sub\":\"a\",\"exp\":" +
                                                       std::to_string(kNow + 60) + "}", s)) == "ok:a");
  BOOST_TEST(Outcome(*hs, std::string(kMaxBearerTokenBytes + 1, 'a')) == "token_too_long");
  BOOST_TEST(hs->Authenticate(WithAuthorization("")).status().reason() == "missing_token");
  BOOST_TEST(hs->Authenticate(WithAuthorization("Token " + good)).status().reason() == "bad_auth_scheme");
}

BOOST_AUTO_TEST_CASE(concurrent_verification_is_safe) {
  const Keys& keys = TestKeys();
  TempDir dir;
  std::string ec = dir.Write("ec.pem", PublicPem(keys.ec.get()), 0644);
  std::string rsa = dir.Write("rsa.pem", PublicPem(keys.rsa.get()), 0644);
  std::vector<std::pair<std::unique_ptr<Authenticator>, Signer>> cases;
  cases.emplace_back(MustMake(AuthMode::kJwt, Hs256Vars()), Signer{});
  cases.emplace_back(MustMake(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "ES256"}, {"CHATD_JWT_PUBLIC_KEY_FILE", ec}}),
                     Signer{Alg::kEs256, "", keys.ec.get()});
  cases.emplace_back(MustMake(AuthMode::kJwt, {{"CHATD_JWT_ALGORITHM", "RS256"}, {"CHATD_JWT_PUBLIC_KEY_FILE", rsa}}),
                     Signer{Alg::kRs256, "", keys.rsa.get()});
  constexpr int kThreads = 4;
  constexpr int kRounds = 50;
  for (auto& [auth, signer] : cases) {
    std::vector<std::string> good, bad;
    for (int t = 0; t < kThreads; ++t) {
      std::string user = "user" + std::to_string(t);
      good.push_back(Jws(Header(signer.alg), Claims(user, kNow + 60), signer));
      Signer other = signer;
      other.secret = kOtherSecret;
      other.key = signer.alg == Alg::kEs256 ? keys.ec_other.get() : keys.rsa_other.get();
      bad.push_back(Jws(Header(signer.alg), Claims(user, kNow + 60), other));
    }
    std::vector<int> right(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kRounds; ++i) {
          Result<Principal> ok = auth->Authenticate(WithAuthorization("Bearer " + good[t]));
          Result<Principal> ko = auth->Authenticate(WithAuthorization("Bearer " + bad[t]));
          if (ok.ok() && *ok->subject == "user" + std::to_string(t) && !ko.ok() &&
              ko.status().reason() == "bad_signature") {
            ++right[t];
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    for (int t = 0; t < kThreads; ++t) BOOST_TEST(right[t] == kRounds);
  }
}

BOOST_AUTO_TEST_SUITE_END()
