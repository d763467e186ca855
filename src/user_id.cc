#include "chatd/user_id.h"

namespace chatd {

namespace {
bool IsUserIdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '.' || c == '@';
}
}  // namespace

bool IsValidUserId(std::string_view user_id) {
  if (user_id.empty() || user_id.size() > kMaxUserIdLength) return false;
  for (char c : user_id) {
    if (!IsUserIdChar(c)) return false;
  }
  return true;
}

std::optional<UserId> UserId::Parse(std::string_view text) {
  if (!IsValidUserId(text)) return std::nullopt;
  return UserId(std::string(text));
}

std::string UserKey(const UserId& user_id, std::string_view suffix) {
  std::string key;
  key.reserve(8 + user_id.str().size() + suffix.size());
  key.append("chat:{").append(user_id.str()).append("}:").append(suffix);
  return key;
}

std::string ChromaCollectionName(const UserId& user_id) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string name = "chatd-u-";
  name.reserve(name.size() + 2 * user_id.str().size());
  for (unsigned char c : user_id.str()) {
    name.push_back(kHex[c >> 4]);
    name.push_back(kHex[c & 0xf]);
  }
  return name;
}

}  // namespace chatd
