#include "src/server/handshake.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <string>
#include <string_view>

#include "src/server/protocol/frame.h"

namespace kvtier::server {
namespace {

// Equal strings, in time that depends on the lengths only (not on where they differ).
bool TokenEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

std::string Hex(uint64_t value) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, value);
  return buf;
}

}  // namespace

std::vector<NamespaceConfig> EffectiveNamespaces(const ServerOptions& options,
                                                 uint32_t daemon_uid) {
  if (!options.namespaces.empty()) return options.namespaces;
  NamespaceConfig ns;
  ns.id = 0;
  ns.name = "default";
  ns.uids = {daemon_uid};
  return {ns};
}

Result<const NamespaceConfig*> CheckHello(const wire::HelloRequest& hello, const PeerIdentity& peer,
                                          const std::vector<NamespaceConfig>& namespaces,
                                          const ModelLayout& layout) {
  if (hello.protocol_version() != wire::kProtocolVersion) {
    return Status::FailedPrecondition(
        "client speaks protocol version " + std::to_string(hello.protocol_version()) +
        ", the daemon speaks " + std::to_string(wire::kProtocolVersion));
  }
  if (hello.layout_fingerprint() != layout.Fingerprint()) {
    const std::string client_layout =
        hello.layout() != nullptr && hello.layout()->size() > 0
            ? hello.layout()->str()
            : "(unnamed, fingerprint " + Hex(hello.layout_fingerprint()) + ")";
    return Status::FailedPrecondition("model layout mismatch: the client has " + client_layout +
                                      ", the daemon's store has " + layout.ToString());
  }
  const auto ns = std::find_if(namespaces.begin(), namespaces.end(), [&](const NamespaceConfig& n) {
    return n.id == hello.namespace_id();
  });
  if (ns == namespaces.end()) {
    return Status::PermissionDenied("namespace " + std::to_string(hello.namespace_id()) +
                                    " is not served by this daemon");
  }
  const std::string_view token =
      hello.token() != nullptr ? hello.token()->string_view() : std::string_view();
  bool allowed = false;
  if (!token.empty()) {
    for (const std::string& t : ns->tokens) {
      // No early exit: the time does not tell which token matched.
      allowed |= TokenEquals(token, t);
    }
  }
  if (peer.unix_socket) {
    allowed = allowed || std::find(ns->uids.begin(), ns->uids.end(), peer.uid) != ns->uids.end() ||
              std::find(ns->gids.begin(), ns->gids.end(), peer.gid) != ns->gids.end();
  }
  if (!allowed) {
    std::string who = peer.unix_socket
                          ? "uid " + std::to_string(peer.uid) + " gid " + std::to_string(peer.gid)
                          : std::string("TCP peer");
    who += token.empty() ? " without a token" : " with an unknown token";
    return Status::PermissionDenied(who + " may not use namespace " + std::to_string(ns->id) +
                                    " (" + ns->name + ")");
  }
  return &*ns;
}

}  // namespace kvtier::server
