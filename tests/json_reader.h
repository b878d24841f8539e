// A small JSON reader for the tests that run the `kvtier` tool and check its --json
// output field by field (objects, arrays, numbers, strings, true/false/null).
#ifndef KVTIER_TESTS_JSON_READER_H_
#define KVTIER_TESTS_JSON_READER_H_

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace kvtier::testing {

struct Json {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;

  bool Has(const std::string& key) const {
    for (const auto& [k, v] : object) {
      if (k == key) return true;
    }
    return false;
  }
  const Json& operator[](const std::string& key) const {
    static const Json kNull;
    for (const auto& [k, v] : object) {
      if (k == key) return v;
    }
    return kNull;
  }
  const Json& operator[](size_t i) const {
    static const Json kNull;
    return i < array.size() ? array[i] : kNull;
  }
  uint64_t U64() const { return static_cast<uint64_t>(number); }
  size_t size() const { return array.size(); }  // 0 unless an array
  std::vector<std::string> keys() const {       // an object's, in document order
    std::vector<std::string> out;
    for (const auto& [k, v] : object) out.push_back(k);
    return out;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  bool Parse(Json* out) {
    if (!Value(out)) return false;
    Space();
    return pos_ == s_.size();
  }

 private:
  void Space() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool Literal(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }
  bool String(std::string* out) {
    if (pos_ >= s_.size() || s_[pos_] != '"') return false;
    ++pos_;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      char c = s_[pos_++];
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ >= s_.size()) return false;
      c = s_[pos_++];
      switch (c) {
        case 'n':
          out->push_back('\n');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'u': {
          if (pos_ + 4 > s_.size()) return false;
          const unsigned v = std::stoul(s_.substr(pos_, 4), nullptr, 16);
          out->push_back(v < 0x80 ? static_cast<char>(v) : '?');
          pos_ += 4;
          break;
        }
        default:
          out->push_back(c);
      }
    }
    if (pos_ >= s_.size()) return false;
    ++pos_;
    return true;
  }
  bool Value(Json* out) {
    Space();
    if (pos_ >= s_.size()) return false;
    const char c = s_[pos_];
    if (c == '{') {
      out->type = Json::Type::kObject;
      ++pos_;
      Space();
      if (pos_ < s_.size() && s_[pos_] == '}') return ++pos_, true;
      for (;;) {
        Space();
        std::string key;
        if (!String(&key)) return false;
        Space();
        if (pos_ >= s_.size() || s_[pos_++] != ':') return false;
        Json v;
        if (!Value(&v)) return false;
        out->object.emplace_back(std::move(key), std::move(v));
        Space();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        return pos_ < s_.size() && s_[pos_++] == '}';
      }
    }
    if (c == '[') {
      out->type = Json::Type::kArray;
      ++pos_;
      Space();
      if (pos_ < s_.size() && s_[pos_] == ']') return ++pos_, true;
      for (;;) {
        Json v;
        if (!Value(&v)) return false;
        out->array.push_back(std::move(v));
        Space();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        return pos_ < s_.size() && s_[pos_++] == ']';
      }
    }
    if (c == '"') {
      out->type = Json::Type::kString;
      return String(&out->string);
    }
    if (Literal("true")) return out->type = Json::Type::kBool, out->boolean = true, true;
    if (Literal("false")) return out->type = Json::Type::kBool, out->boolean = false, true;
    if (Literal("null")) return out->type = Json::Type::kNull, true;
    const char* begin = s_.c_str() + pos_;
    char* end = nullptr;
    out->number = std::strtod(begin, &end);
    if (end == begin) return false;
    out->type = Json::Type::kNumber;
    pos_ += static_cast<size_t>(end - begin);
    return true;
  }

  const std::string& s_;
  size_t pos_ = 0;
};

}  // namespace kvtier::testing

#endif  // KVTIER_TESTS_JSON_READER_H_
