#include "chatd/memory.h"

namespace chatd {

namespace {
constexpr std::string_view kUserSuffix = ":u";
constexpr std::string_view kAssistantSuffix = ":a";
}  // namespace

std::string_view RoleName(Role role) { return role == Role::kUser ? "user" : "assistant"; }

std::string_view MessageIdSuffix(Role role) { return role == Role::kUser ? kUserSuffix : kAssistantSuffix; }

std::string MessageId(std::string_view turn_id, Role role) {
  const std::string_view suffix = MessageIdSuffix(role);
  std::string id;
  id.reserve(turn_id.size() + suffix.size());
  id.append(turn_id).append(suffix);
  return id;
}

std::optional<TurnAndRole> SplitMessageId(std::string_view id) {
  const size_t n = kUserSuffix.size();
  if (id.size() <= n) return std::nullopt;
  const std::string_view suffix = id.substr(id.size() - n);
  if (suffix != kUserSuffix && suffix != kAssistantSuffix) return std::nullopt;
  return TurnAndRole{id.substr(0, id.size() - n), suffix == kUserSuffix ? Role::kUser : Role::kAssistant};
}

}  // namespace chatd
