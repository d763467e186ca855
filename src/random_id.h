// Unique ids for turns and requests: 128 random bits as 32 lower-case hex
// digits, from a per-thread generator seeded by the OS (no lock, no syscall per
// id). Unguessable enough to keep ids apart, not meant as secrets.
#pragma once

#include <string>

namespace chatd {

std::string RandomHexId();

}  // namespace chatd
