#include "secret_file.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "unique_fd.h"

namespace chatd {

namespace {

constexpr size_t kMaxProtectedFileBytes = 64 * 1024;

}  // namespace

Status BadConfig(std::string_view variable, std::string_view why) {
  std::string message(variable);
  message.append(" ").append(why);
  return InvalidArgument("bad_config", std::move(message));
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

}  // namespace chatd
