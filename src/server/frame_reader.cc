#include "src/server/frame_reader.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace kvtier::server {

FrameReader::FrameReader(uint32_t max_frame_bytes)
    : max_frame_bytes_(std::max(max_frame_bytes, wire::kHeaderBytes)),
      buffer_(std::min<size_t>(kInitialBufferBytes, max_frame_bytes_)) {}

std::span<uint8_t> FrameReader::WritableSpan() {
  if (!error_.ok()) return {};
  // Bytes the frame at begin_ needs in all: its header, then, once that is known, the
  // whole frame.
  const size_t needed = frame_bytes_ != 0 ? frame_bytes_ : wire::kHeaderBytes;
  if (end_ - begin_ >= needed && frame_bytes_ != 0) return {};  // a complete frame waits
  if (begin_ == end_) {
    begin_ = end_ = 0;
  } else if (begin_ % kBodyAlignment != 0 || buffer_.size() - begin_ < needed ||
             end_ == buffer_.size()) {
    // To the front: room for the frame, and its body 8-aligned (the header is 24 bytes).
    std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (buffer_.size() < needed) buffer_.resize(needed);
  return std::span<uint8_t>(buffer_.data() + end_, buffer_.size() - end_);
}

void FrameReader::Commit(size_t bytes) { end_ = std::min(end_ + bytes, buffer_.size()); }

FrameReader::Result FrameReader::Next(Frame* frame) {
  if (!error_.ok()) return kError;
  const size_t available = end_ - begin_;
  if (frame_bytes_ == 0) {
    if (available < wire::kHeaderBytes) return kNeedMore;
    const std::span<const uint8_t, wire::kHeaderBytes> raw(buffer_.data() + begin_,
                                                           wire::kHeaderBytes);
    kvtier::Result<wire::FrameHeader> header =
        wire::DecodeHeader(raw, max_frame_bytes_, /*expect_reply=*/false);
    if (!header.ok()) {
      error_ = header.status();
      for (size_t i = 0; i < 8; ++i) error_request_id_ |= uint64_t{raw[16 + i]} << (8 * i);
      return kError;
    }
    header_ = *header;
    frame_bytes_ = size_t{wire::kHeaderBytes} + header_.body_bytes;
  }
  if (available < frame_bytes_) return kNeedMore;
  frame->header = header_;
  const uint8_t* body = buffer_.data() + begin_ + wire::kHeaderBytes;
  if (header_.body_bytes > 0 && reinterpret_cast<uintptr_t>(body) % kBodyAlignment != 0) {
    // It came in one receive behind a body whose size was not a multiple of 8: reading
    // its 8-byte fields in place would be misaligned.
    aligned_.resize((header_.body_bytes + sizeof(uint64_t) - 1) / sizeof(uint64_t));
    std::memcpy(aligned_.data(), body, header_.body_bytes);
    body = reinterpret_cast<const uint8_t*>(aligned_.data());
  }
  frame->body = std::span<const uint8_t>(body, header_.body_bytes);
  return kFrame;
}

void FrameReader::Consume() {
  if (frame_bytes_ == 0 || end_ - begin_ < frame_bytes_) return;
  // Positions only move in WritableSpan(): a receive may be pending into [end_, size).
  begin_ += frame_bytes_;
  frame_bytes_ = 0;
}

}  // namespace kvtier::server
