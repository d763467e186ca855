#include "chatd/prompt.h"

#include <algorithm>
#include <cstdio>
#include <ctime>

namespace chatd {

namespace {
constexpr std::string_view kMemoryPreamble =
    "Excerpts of earlier conversation with this user, recalled because they may be relevant. "
    "Use them only if they help:";
// Bytes a memory line adds besides its content: "\n[2026-11-28 15:04 UTC] assistant: ".
constexpr size_t kMemoryLineOverhead = 40;
}

std::string FormatUtcMinute(int64_t ts_ms) {
  std::time_t secs = static_cast<std::time_t>(ts_ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char out[64];  // room for any int the compiler imagines in tm
  std::snprintf(out, sizeof(out), "%04d-%02d-%02d %02d:%02d UTC", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min);
  return out;
}

std::vector<ChatMessage> BuildPrompt(const PromptInput& in) {
  size_t left = in.budget_bytes > in.message->size() ? in.budget_bytes - in.message->size() : 0;

  // Recent messages, newest first, while they fit.
  const auto& recent = *in.recent;
  size_t keep_from = recent.size();
  while (keep_from > 0 && recent[keep_from - 1].content.size() <= left) {
    left -= recent[keep_from - 1].content.size();
    --keep_from;
  }

  // Memories, most relevant first, while they fit; then shown chronologically.
  std::vector<const StoredMessage*> kept;
  size_t preamble = kMemoryPreamble.size();
  for (const auto& m : *in.memories) {
    size_t cost = m.message.content.size() + kMemoryLineOverhead + (kept.empty() ? preamble : 0);
    if (cost > left) continue;
    left -= cost;
    kept.push_back(&m.message);
  }
  std::stable_sort(kept.begin(), kept.end(),
                   [](const StoredMessage* a, const StoredMessage* b) { return a->ts_ms < b->ts_ms; });

  std::vector<ChatMessage> out;
  out.reserve(3 + recent.size() - keep_from);
  if (!in.system_prompt->empty()) out.push_back({"system", *in.system_prompt});
  if (!kept.empty()) {
    std::string text(kMemoryPreamble);
    for (const StoredMessage* m : kept) {
      text.append("\n[").append(FormatUtcMinute(m->ts_ms)).append("] ");
      text.append(m->role == Role::kUser ? "user: " : "assistant: ").append(m->content);
    }
    out.push_back({"system", std::move(text)});
  }
  for (size_t i = keep_from; i < recent.size(); ++i) {
    out.push_back({std::string(RoleName(recent[i].role)), recent[i].content});
  }
  out.push_back({"user", *in.message});
  return out;
}

}  // namespace chatd
