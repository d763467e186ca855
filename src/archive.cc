#include "archive.h"

#include <dirent.h>
#include <fcntl.h>
#include <rapidjson/document.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "decimal.h"
#include "json.h"
#include "json_document.h"
#include "random_id.h"
#include "chatd/user_id.h"
#include "unique_fd.h"
#include "json_writer.h"

namespace chatd {

namespace {

constexpr std::string_view kFormat = "chatd-archive/1";
constexpr mode_t kDirMode = 0750;
constexpr mode_t kFileMode = 0640;  // memories are personal data

Status IoError(const std::string& what, const std::string& path) {
  return Status(Code::kUnavailable, "archive_io", what + " " + path + ": " + std::strerror(errno));
}

Status FsyncPath(const std::string& path, int flags) {
  UniqueFd fd(::open(path.c_str(), flags | O_CLOEXEC));
  if (!fd.valid()) return IoError("open", path);
  if (::fsync(fd.get()) != 0) return IoError("fsync", path);
  return Status::Ok();
}

Status MakeDirs(const std::string& dir) {
  std::string partial;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || (dir[i] == '/' && i > 0)) {
      partial = dir.substr(0, i);
      if (::mkdir(partial.c_str(), kDirMode) != 0 && errno != EEXIST) return IoError("mkdir", partial);
    }
  }
  return Status::Ok();
}

std::string Parent(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

}  // namespace

std::string ArchiveUserDir(std::string_view archive_dir, const UserId& user_id) {
  return std::string(archive_dir) + "/" + ChromaCollectionName(user_id);
}

std::string ArchivePath(std::string_view archive_dir, const UserId& user_id, int64_t last_activity_ms) {
  return ArchiveUserDir(archive_dir, user_id) + "/" + std::to_string(last_activity_ms) + ".json";
}

std::string SerializeArchive(const Archive& a) {
  std::string out;
  out.reserve(256 + a.records.size() * 2048);
  JsonWriter w(out);
  w.StartObject();
  w.Key("format").String(kFormat).Key("user").String(a.user_id.str());
  w.Key("collection").String(ChromaCollectionName(a.user_id));
  w.Key("last_activity_ms").Int(a.last_activity_ms).Key("archived_at_ms").Int(a.archived_at_ms);
  w.Key("records").StartArray();
  char digits[32];
  for (const StoredMessage& m : a.records) {
    out.push_back('\n');  // a record a line: whitespace between values, for people reading the file
    w.StartObject().Key("id").String(m.id).Key("document").String(m.content);
    w.Key("metadata").StartObject();
    w.Key("role").String(RoleName(m.role)).Key("ts").Int(m.ts_ms).Key("user").String(m.user_id);
    w.Key("turn").String(m.turn_id);
    w.EndObject();
    w.Key("embedding").StartArray();
    for (float f : m.embedding) {
      // Nine significant digits read back as the same float.
      std::snprintf(digits, sizeof(digits), "%.9g", static_cast<double>(f));
      w.RawNumber(digits);
    }
    w.EndArray().EndObject();
  }
  out.push_back('\n');
  w.EndArray().EndObject();
  out.push_back('\n');
  return out;
}

Result<Archive> ParseArchive(std::string_view json) {
  auto bad = [](const std::string& why) { return Status(Code::kInternal, "bad_archive", "archive: " + why); };
  LocalJsonDocument doc;
  // Not kParseFullPrecisionFlag: in RapidJSON 1.1.0 that path misreads a zero
  // with a large exponent ("0e39" becomes -1.5e228, through an undefined
  // __builtin_clzll(0); found by tests/fuzz/fuzz_archive.cc). The default
  // path is within a few double ulps, far below the gap between the 9 digits
  // we write and the midpoint of two floats, so every float still reads back
  // exactly (tests/unit/archive_test.cc checks it).
  doc.Parse<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag>(json.data(), json.size());
  if (doc.HasParseError() || !doc.IsObject()) return bad("not a JSON object");
  auto str = [](const rapidjson::Value& obj, const char* key, std::string& out) {
    auto it = obj.FindMember(key);
    if (it == obj.MemberEnd() || !it->value.IsString()) return false;
    out.assign(it->value.GetString(), it->value.GetStringLength());
    return true;
  };
  auto num = [](const rapidjson::Value& obj, const char* key, int64_t& out) {
    auto it = obj.FindMember(key);
    if (it == obj.MemberEnd() || !it->value.IsInt64()) return false;
    out = it->value.GetInt64();
    return true;
  };
  std::string format, user;
  if (!str(doc, "format", format) || format != kFormat) return bad("unknown format");
  // The file names its user: parsed here, like every id read back from storage.
  std::optional<UserId> user_id = str(doc, "user", user) ? UserId::Parse(user) : std::nullopt;
  if (!user_id) return bad("bad user");
  Archive a(std::move(*user_id));
  if (!num(doc, "last_activity_ms", a.last_activity_ms) || !num(doc, "archived_at_ms", a.archived_at_ms)) {
    return bad("bad times");
  }
  auto records = doc.FindMember("records");
  if (records == doc.MemberEnd() || !records->value.IsArray()) return bad("no records");
  for (const auto& r : records->value.GetArray()) {
    if (!r.IsObject()) return bad("record is not an object");
    StoredMessage m;
    std::string role;
    auto meta = r.FindMember("metadata");
    auto emb = r.FindMember("embedding");
    if (!str(r, "id", m.id) || !str(r, "document", m.content) || meta == r.MemberEnd() ||
        !meta->value.IsObject() || emb == r.MemberEnd() || !emb->value.IsArray()) {
      return bad("incomplete record");
    }
    if (!str(meta->value, "role", role) || !num(meta->value, "ts", m.ts_ms) ||
        !str(meta->value, "user", m.user_id) || !str(meta->value, "turn", m.turn_id)) {
      return bad("incomplete metadata");
    }
    if (role != "user" && role != "assistant") return bad("bad role");
    // RapidJSON 1.1.0 decodes an escaped lone low surrogate ("\udd00") into
    // bytes that are not UTF-8, despite kParseValidateEncodingFlag; such a
    // record could never be written back to Chroma (found by
    // tests/fuzz/fuzz_archive.cc).
    if (!IsValidUtf8(m.id) || !IsValidUtf8(m.content) || !IsValidUtf8(m.user_id) || !IsValidUtf8(m.turn_id)) {
      return bad("record text is not UTF-8");
    }
    m.role = role == "user" ? Role::kUser : Role::kAssistant;
    m.embedding.reserve(emb->value.Size());
    for (const auto& x : emb->value.GetArray()) {
      float f = 0;
      if (!x.IsNumber() || !JsonToFloat(x.GetDouble(), &f)) return bad("bad embedding");
      m.embedding.push_back(f);
    }
    a.records.push_back(std::move(m));
  }
  return a;
}

Status WriteFileDurably(const std::string& path, std::string_view content) {
  std::string dir = Parent(path);
  if (Status s = MakeDirs(dir); !s.ok()) return s;
  // A name of its own per write (O_EXCL makes sure): two writers of one path
  // must never write into, or rename, each other's half-written file.
  std::string tmp = path + "." + RandomHexId() + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, kFileMode));
  if (!fd.valid()) return IoError("create", tmp);
  const char* p = content.data();
  size_t left = content.size();
  while (left > 0) {
    ssize_t n = ::write(fd.get(), p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      Status s = IoError("write", tmp);
      fd.reset();
      ::unlink(tmp.c_str());
      return s;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) {
    Status s = IoError("fsync", tmp);
    fd.reset();
    ::unlink(tmp.c_str());
    return s;
  }
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Status s = IoError("rename", tmp);
    ::unlink(tmp.c_str());
    return s;
  }
  return FsyncPath(dir, O_RDONLY | O_DIRECTORY);
}

Result<std::string> ReadFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return IoError("open", path);
  std::string out;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return IoError("read", path);
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

std::optional<int64_t> ArchiveFileStamp(std::string_view file_name) {
  constexpr std::string_view kSuffix = ".json";
  if (!file_name.ends_with(kSuffix)) return std::nullopt;
  return ParseDecimal(file_name.substr(0, file_name.size() - kSuffix.size()));
}

Result<std::vector<std::string>> ListArchives(std::string_view archive_dir, const UserId& user_id) {
  std::string dir = ArchiveUserDir(archive_dir, user_id);
  std::vector<std::pair<int64_t, std::string>> found;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return std::vector<std::string>{};
    return IoError("opendir", dir);
  }
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    // Not ours (a stray file, *.json.tmp, a stamp beyond int64): skipped, so
    // a strange name in the folder cannot stop a restore or a forget.
    std::optional<int64_t> stamp = ArchiveFileStamp(name);
    if (!stamp) continue;
    found.emplace_back(*stamp, dir + "/" + name);
  }
  ::closedir(d);
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [ts, path] : found) out.push_back(std::move(path));
  return out;
}

Status RemoveArchives(std::string_view archive_dir, const UserId& user_id, const std::vector<std::string>& paths) {
  std::string user_dir = ArchiveUserDir(archive_dir, user_id);
  struct stat st {};
  if (paths.empty() && ::stat(user_dir.c_str(), &st) != 0 && errno == ENOENT) return Status::Ok();  // nothing there
  for (const std::string& p : paths) {
    if (::unlink(p.c_str()) != 0 && errno != ENOENT) return IoError("unlink", p);
  }
  const std::string& dir = user_dir;
  // Leftover temporary files of a crashed write go too.
  if (DIR* d = ::opendir(dir.c_str())) {
    std::vector<std::string> tmp;
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name.size() > 4 && name.substr(name.size() - 4) == ".tmp") tmp.push_back(dir + "/" + name);
    }
    ::closedir(d);
    for (const auto& t : tmp) ::unlink(t.c_str());
  }
  if (::rmdir(dir.c_str()) != 0 && errno != ENOENT && errno != ENOTEMPTY) return IoError("rmdir", dir);
  return FsyncPath(std::string(archive_dir), O_RDONLY | O_DIRECTORY);
}

std::vector<StoredMessage> MergeById(std::vector<StoredMessage> a, std::vector<StoredMessage> b) {
  std::map<std::string, StoredMessage> by_id;
  for (auto& m : a) by_id[m.id] = std::move(m);
  for (auto& m : b) by_id[m.id] = std::move(m);
  std::vector<StoredMessage> out;
  out.reserve(by_id.size());
  for (auto& [id, m] : by_id) out.push_back(std::move(m));
  std::stable_sort(out.begin(), out.end(),
                   [](const StoredMessage& x, const StoredMessage& y) { return x.ts_ms < y.ts_ms; });
  return out;
}

}  // namespace chatd
