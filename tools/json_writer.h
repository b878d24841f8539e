// JsonWriter: the one-line JSON documents the `kvtier` subcommands print with --json.
// Keys come out in the order they are written (stable field names, stable order), numbers
// as %.6g (integers exactly), and a number that is not finite as null.
//
//   JsonWriter w;
//   w.BeginObject();
//   w.Key("tokens"), w.Int(4096);
//   w.Key("recall"), w.Number(0.97);
//   w.EndObject();
//   std::puts(w.str().c_str());   // {"tokens":4096,"recall":0.97}
//
// Thread safety: one thread's object.
#ifndef KVTIER_TOOLS_JSON_WRITER_H_
#define KVTIER_TOOLS_JSON_WRITER_H_

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

namespace kvtier::tools {

class JsonWriter {
 public:
  void BeginObject() { Open('{'); }
  void EndObject() { Close('}'); }
  void BeginArray() { Open('['); }
  void EndArray() { Close(']'); }
  // The next value is this member of the enclosing object.
  void Key(std::string_view key) {
    Separate();
    AppendString(key);
    out_ += ':';
    after_key_ = true;
  }
  void Int(int64_t v) { Append(std::to_string(v)); }
  void Uint(uint64_t v) { Append(std::to_string(v)); }
  void Number(double v) {
    if (!std::isfinite(v)) {
      Append("null");
      return;
    }
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.6g", v);
    Append(buf);
  }
  void Bool(bool v) { Append(v ? "true" : "false"); }
  void String(std::string_view v) {
    Separate();
    AppendString(v);
  }
  template <typename T>
  void NumberArray(const std::vector<T>& values) {
    BeginArray();
    for (const T& v : values) Number(static_cast<double>(v));
    EndArray();
  }

  const std::string& str() const { return out_; }

 private:
  void Open(char c) {
    Separate();
    out_ += c;
    first_.push_back(true);
  }
  void Close(char c) {
    out_ += c;
    first_.pop_back();
  }
  void Append(std::string_view text) {
    Separate();
    out_ += text;
  }
  // A comma before every value but the first of its container (a member's value follows
  // its key directly).
  void Separate() {
    if (after_key_) {
      after_key_ = false;
      return;
    }
    if (!first_.empty()) {
      if (!first_.back()) out_ += ',';
      first_.back() = false;
    }
  }
  void AppendString(std::string_view s) {
    out_ += '"';
    for (char c : s) {
      if (c == '"' || c == '\\') {
        out_ += '\\';
        out_ += c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
        out_ += buf;
      } else {
        out_ += c;
      }
    }
    out_ += '"';
  }

  std::string out_;
  std::vector<bool> first_;  // per open container: no value written in it yet
  bool after_key_ = false;
};

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_JSON_WRITER_H_
