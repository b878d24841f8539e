// FrameReader: the incremental parser of the request stream of one connection. Bytes
// are received straight into its buffer (WritableSpan, then Commit); Next() yields each
// complete frame (header and body) in order, or a framing error after which the stream
// cannot be resynchronized (PROTOCOL.md, "Framing rules").
//
//   FrameReader reader(max_frame_bytes);
//   n = recv(fd, reader.WritableSpan().data(), reader.WritableSpan().size(), 0);
//   reader.Commit(n);
//   while (reader.Next(&frame) == FrameReader::kFrame) { ...; reader.Consume(); }
//
// Memory: one buffer, reused; it starts at kInitialBufferBytes and grows (once) to the
// largest frame seen, never past max_frame_bytes. No allocation in the steady state.
//
// Alignment: a frame's body is handed out 8-byte aligned (FlatBuffers reads 8-byte
// fields in place). Bodies whose sizes are not multiples of 8 put the next frame off
// alignment; WritableSpan realigns the bytes it keeps, and a frame that arrived whole
// behind such a body is copied to an aligned scratch buffer (also reused).
//
// Thread safety: none; one connection's reader is used by one thread at a time.
#ifndef KVTIER_SERVER_FRAME_READER_H_
#define KVTIER_SERVER_FRAME_READER_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtier/status.h"
#include "src/server/protocol/frame.h"

namespace kvtier::server {

class FrameReader {
 public:
  static constexpr uint32_t kInitialBufferBytes = 64u << 10;
  static constexpr size_t kBodyAlignment = 8;

  enum Result { kNeedMore, kFrame, kError };

  struct Frame {
    wire::FrameHeader header;
    std::span<const uint8_t> body;  // 8-aligned; valid until Consume(), Next(), WritableSpan()
  };

  // `max_frame_bytes`: the largest frame (header and body) accepted; at least
  // wire::kHeaderBytes.
  explicit FrameReader(uint32_t max_frame_bytes);

  FrameReader(const FrameReader&) = delete;
  FrameReader& operator=(const FrameReader&) = delete;

  // Where to receive the next bytes: never empty unless a complete frame is pending
  // (Next() returns kFrame) or the stream failed. Makes room by moving the unconsumed
  // bytes to the front of the buffer, or growing it for a frame larger than it.
  std::span<uint8_t> WritableSpan();
  // `bytes` (at most WritableSpan().size()) were written at WritableSpan().data().
  void Commit(size_t bytes);

  // The next frame when it is complete (kFrame: *frame is set, and stays the answer
  // until Consume()), kNeedMore, or kError (error() says why, error_request_id() is the
  // request id the bad header carried); an error is final.
  Result Next(Frame* frame);
  // Drops the frame Next() returned.
  void Consume();

  const Status& error() const { return error_; }
  uint64_t error_request_id() const { return error_request_id_; }
  // Bytes received and not yet consumed.
  size_t buffered_bytes() const { return end_ - begin_; }

 private:
  const uint32_t max_frame_bytes_;
  std::vector<uint8_t> buffer_;
  std::vector<uint64_t> aligned_;  // a misaligned body's copy
  size_t begin_ = 0;               // first unconsumed byte
  size_t end_ = 0;                 // one past the last received byte
  // Total bytes (header and body) of the frame at begin_, once its header is decoded.
  size_t frame_bytes_ = 0;
  wire::FrameHeader header_;
  Status error_;
  uint64_t error_request_id_ = 0;
};

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_FRAME_READER_H_
