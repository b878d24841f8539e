// kvtier's log: spdlog, to stderr (a library never writes to its host's stdout), at
// "info" unless KVTIER_LOG_LEVEL (trace, debug, info, warn, error, off) says otherwise.
#ifndef KVTIER_UTIL_LOG_H_
#define KVTIER_UTIL_LOG_H_

#include <spdlog/spdlog.h>

namespace kvtier {

// The "kvtier" logger; thread-safe.
spdlog::logger& Log();

}  // namespace kvtier

#endif  // KVTIER_UTIL_LOG_H_
