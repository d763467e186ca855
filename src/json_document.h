// A RapidJSON document that parses small JSON without touching the heap.
//
// RapidJSON's default Document takes a 64 KiB chunk from malloc for its values
// on every parse, and glibc merges its free lists before every allocation that
// large. A chat parses several small documents (its body, each recent message
// read from Redis, the model's reply or each streamed chunk); for a stored
// message that allocation was a third of the parse's instructions. This
// document starts in two buffers of
// its own, on the caller's stack, and spills to malloc only when a document
// outgrows them.
#pragma once

#include <rapidjson/document.h>

#include <cstddef>

namespace chatd {

// Sized for the documents of a chat's request path: a stored message or a
// model reply of a few KiB fits; a large body or a Chroma answer spills.
inline constexpr size_t kLocalJsonValueBytes = 8 * 1024;
// The parser's stack (nesting, and each string before it is copied into the
// values) and the document's stack of values under construction share it.
inline constexpr size_t kLocalJsonStackBytes = 4 * 1024;
inline constexpr size_t kLocalJsonDocumentStackBytes = 1024;

// The buffers and their allocators, in a base class so that they exist
// before the document (the other base) is built to point into them.
class LocalJsonStorage {
 protected:
  LocalJsonStorage()
      : json_values_(value_buffer_, sizeof(value_buffer_)), json_stack_(stack_buffer_, sizeof(stack_buffer_)) {}

  alignas(std::max_align_t) char value_buffer_[kLocalJsonValueBytes];
  alignas(std::max_align_t) char stack_buffer_[kLocalJsonStackBytes];
  rapidjson::MemoryPoolAllocator<> json_values_;
  rapidjson::MemoryPoolAllocator<> json_stack_;
};

// Used as a rapidjson::Document is: `LocalJsonDocument doc; doc.Parse<...>(...)`.
class LocalJsonDocument
    : private LocalJsonStorage,
      public rapidjson::GenericDocument<rapidjson::UTF8<>, rapidjson::MemoryPoolAllocator<>,
                                        rapidjson::MemoryPoolAllocator<>> {
 public:
  LocalJsonDocument() : GenericDocument(&json_values_, kLocalJsonDocumentStackBytes, &json_stack_) {}
  // The document points into this object's own buffers.
  LocalJsonDocument(const LocalJsonDocument&) = delete;
  LocalJsonDocument& operator=(const LocalJsonDocument&) = delete;
  LocalJsonDocument(LocalJsonDocument&&) = delete;
  LocalJsonDocument& operator=(LocalJsonDocument&&) = delete;
};

}  // namespace chatd
