// The binary record of one hot-set message (memory.h, UserMemory::hot), and
// the float-vector bytes it ends with. Binary because a chat reads up to
// CHATD_RECALL_HOT_MESSAGES of them; read in place (HotRecordView) because a
// chat ranks them all but keeps only CHATD_RECALL_K, so only those are
// decoded into StoredMessage (recall.h).
//
// Layout, all little-endian: version byte, ts (int64), role byte, turn id
// (u16 length + bytes), content (u32 length + bytes), then the embedding as
// float32 to the end. The user is the key's, so it is not stored.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/memory.h"
#include "chatd/status.h"

namespace chatd {

// Float vectors travel through Redis as little-endian float32 bytes.
std::string PackEmbedding(const std::vector<float>& v);
bool UnpackEmbedding(std::string_view bytes, std::vector<float>& out);

std::string PackHotRecord(const StoredMessage& m);
// Refuses anything truncated or of another version (kInternal "bad_hot_record").
Result<StoredMessage> UnpackHotRecord(std::string_view bytes);

// A record's fields as views into its bytes; valid while they are.
struct HotRecordView {
  int64_t ts_ms = 0;
  Role role = Role::kUser;
  std::string_view turn_id;
  std::string_view content;
  std::string_view embedding;  // float32 bytes, a multiple of 4
  size_t dimensions() const { return embedding.size() / sizeof(float); }
};

// False for anything UnpackHotRecord refuses.
bool ViewHotRecord(std::string_view bytes, HotRecordView& out);

// Squared L2 between n float32s stored as bytes (any alignment: a record's
// embedding in place) and n floats; infinite for n == 0. recall.h's
// SquaredL2 is this for two vectors.
double SquaredL2Packed(const char* packed, const float* query, size_t n);

}  // namespace chatd
