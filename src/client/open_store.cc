// Store::Open: an embedded store, or a client of kvtierd when the options name one. It
// lives above src/core because it needs both.
#include "kvtier/store.h"
#include "src/client/sidecar_store.h"
#include "src/core/embedded_store.h"

namespace kvtier {

Result<std::unique_ptr<Store>> Store::Open(const StoreOptions& options, const ModelLayout& layout) {
  if (options.sidecar.socket.empty() && options.sidecar.tcp_address.empty()) {
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<EmbeddedStore> store,
                            EmbeddedStore::Open(options, layout));
    return std::unique_ptr<Store>(std::move(store));
  }
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<client::SidecarStore> store,
                          client::SidecarStore::Open(options, layout));
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace kvtier
