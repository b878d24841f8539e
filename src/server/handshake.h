// The Hello check of the kvtierd handshake (PROTOCOL.md, "Handshake"), as a pure
// function so that it can be unit-tested and fuzzed without sockets.
//
// Thread safety: stateless; every function may be called from any thread.
#ifndef KVTIER_SERVER_HANDSHAKE_H_
#define KVTIER_SERVER_HANDSHAKE_H_

#include <cstdint>
#include <vector>

#include "kvtier/layout.h"
#include "kvtier/status.h"
#include "src/server/protocol/frame.h"
#include "src/server/protocol/kvtier_generated.h"
#include "src/server/server.h"

namespace kvtier::server {

// Who is at the other end of a connection. On the Unix socket uid, gid and pid come from
// SO_PEERCRED when the connection is accepted; over TCP they are meaningless (zero) and
// only a token identifies the peer.
struct PeerIdentity {
  bool unix_socket = false;
  uint32_t uid = 0;
  uint32_t gid = 0;
  int32_t pid = 0;
};

// The namespaces a server with `options` serves: options.namespaces, or, when that is
// empty, namespace 0 ("default") open to `daemon_uid` alone.
std::vector<NamespaceConfig> EffectiveNamespaces(const ServerOptions& options, uint32_t daemon_uid);

// Decides a Hello: the namespace the session will work in (a pointer into
// `namespaces`, which must outlive its use), or why the peer is refused:
//   FailedPrecondition  the protocol version is not kProtocolVersion, or the layout
//                       fingerprint differs from `layout`'s (the message names both);
//   PermissionDenied    the namespace is not configured, or the peer may not use it: on
//                       the Unix socket its uid is in ns.uids, its gid in ns.gids or its
//                       token in ns.tokens; over TCP only a token counts.
// Tokens are compared in constant time; an empty token never matches.
Result<const NamespaceConfig*> CheckHello(const wire::HelloRequest& hello, const PeerIdentity& peer,
                                          const std::vector<NamespaceConfig>& namespaces,
                                          const ModelLayout& layout);

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_HANDSHAKE_H_
