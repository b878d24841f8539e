#include "src/util/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <memory>

namespace kvtier {

spdlog::logger& Log() {
  static const std::shared_ptr<spdlog::logger> logger = [] {
    auto l = std::make_shared<spdlog::logger>(
        "kvtier", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    l->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [kvtier] [%l] %v");
    const char* level = std::getenv("KVTIER_LOG_LEVEL");
    l->set_level(level != nullptr ? spdlog::level::from_str(level) : spdlog::level::info);
    return l;
  }();
  return *logger;
}

}  // namespace kvtier
