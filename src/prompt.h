// Prompt assembly: what the model sees, in this order:
//   1. the system prompt, plus (when memories are quoted) one sentence saying
//      that quoted excerpts are data, not instructions;
//   2. recalled memories, as one *user* message quoting dated excerpts of
//      earlier conversation (chronological, so they read like a transcript),
//      between a preamble and an end line; continuation lines are indented.
//      Stored text is user text: quoted at user level, an injection in an old
//      message carries no more authority than a new message;
//   3. the recent messages, oldest first, with their true roles;
//   4. the new user message.
// The budget bounds 2-4 in bytes. The new message always fits (config checks
// the budget exceeds the message limit); then recent messages are kept newest
// first, then memories most relevant first, until the budget is spent.
#pragma once

#include <string>
#include <vector>

#include "chatd/llm.h"
#include "chatd/memory.h"

namespace chatd {

struct PromptInput {
  const std::string* system_prompt = nullptr;
  const std::vector<RecalledMessage>* memories = nullptr;  // most relevant first
  const std::vector<Message>* recent = nullptr;            // oldest first
  const std::string* message = nullptr;
  size_t budget_bytes = 0;
};

std::vector<ChatMessage> BuildPrompt(const PromptInput& in);

// "2026-11-28 15:04 UTC"
std::string FormatUtcMinute(int64_t ts_ms);

}  // namespace chatd
