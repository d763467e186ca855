// The option builders behind Wire (wiring.h), exposed for unit tests: what
// each binary gets from the configuration, without opening anything.
#pragma once

#include <atomic>
#include <cstdint>

#include "chroma.h"
#include "chatd/config.h"
#include "chatd/redis.h"
#include "chatd/wiring.h"
#include "openai_chat.h"
#include "openai_embedder.h"

namespace chatd {

RedisOptions MakeRedisOptions(const Config& c, Binary binary);
ChromaOptions MakeChromaOptions(const Config& c, Binary binary, std::atomic<uint64_t>* calls);
OpenAIEmbedderOptions MakeOpenAIEmbedderOptions(const Config& c, Binary binary);
OpenAIChatOptions MakeOpenAIChatOptions(const Config& c);

}  // namespace chatd
