# Tests of kvtier as its users see it: the C API from C, the README's C++ example, and
# the installed package (CMake config and pkg-config file). Included by CMakeLists.txt.

# --- The C API, compiled as C99 -------------------------------------------------------
foreach(name IN ITEMS c_api_test c_api_async_test)
  add_executable(kvtier_${name} ${name}.c)
  set_target_properties(kvtier_${name} PROPERTIES
    C_STANDARD 99
    C_STANDARD_REQUIRED ON
    C_EXTENSIONS OFF)
  if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(kvtier_${name} PRIVATE -Wall -Wextra -Wpedantic)
  endif()
  target_link_libraries(kvtier_${name} PRIVATE kvtier Threads::Threads)
endforeach()
add_test(NAME c_api COMMAND kvtier_c_api_test)
add_test(NAME c_api_async COMMAND kvtier_c_api_async_test)
set_tests_properties(c_api c_api_async PROPERTIES TIMEOUT 120)

# --- The README's C++ examples, extracted at configure time ----------------------------
# A section's one ```cpp block becomes a .cc file; editing README.md re-runs CMake, so the
# tests always build what the README shows.
set(KVTIER_README ${PROJECT_SOURCE_DIR}/README.md)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${KVTIER_README})
if(NOT EXISTS ${KVTIER_README})
  message(FATAL_ERROR "tests/api.cmake: ${KVTIER_README} does not exist")
endif()
file(READ ${KVTIER_README} readme_text)
string(REPLACE "\r\n" "\n" readme_text "${readme_text}")

# Writes the ```cpp block of the README section `heading` to `out`.
function(kvtier_readme_example heading out)
  # The heading must start a line; the section runs to the next "## " heading or the end.
  string(FIND "\n${readme_text}" "\n${heading}\n" section_at)
  if(section_at EQUAL -1)
    message(FATAL_ERROR "README.md has no \"${heading}\" section")
  endif()
  string(LENGTH "${heading}" heading_length)
  math(EXPR section_at "${section_at} + ${heading_length}")
  string(SUBSTRING "${readme_text}" ${section_at} -1 section)
  string(FIND "${section}" "\n## " section_end)
  if(NOT section_end EQUAL -1)
    string(SUBSTRING "${section}" 0 ${section_end} section)
  endif()
  string(REGEX MATCHALL "\n```cpp\n" fences "${section}")
  list(LENGTH fences fence_count)
  if(NOT fence_count EQUAL 1)
    message(FATAL_ERROR "README.md's \"${heading}\" section must hold exactly one ```cpp "
                        "block; it holds ${fence_count}")
  endif()
  string(FIND "${section}" "\n```cpp\n" code_at)
  math(EXPR code_at "${code_at} + 8")  # past "\n```cpp\n"
  string(SUBSTRING "${section}" ${code_at} -1 code)
  string(FIND "\n${code}" "\n```" code_end)
  if(code_end EQUAL -1)
    message(FATAL_ERROR "README.md: the ```cpp block of \"${heading}\" is not closed")
  endif()
  string(SUBSTRING "${code}" 0 ${code_end} code)
  # Written through configure_file so that an unchanged example is not rebuilt.
  file(WRITE ${out}.tmp "${code}")
  configure_file(${out}.tmp ${out} COPYONLY)
endfunction()

set(KVTIER_README_EXAMPLE ${CMAKE_CURRENT_BINARY_DIR}/readme_example/readme_example.cc)
kvtier_readme_example("## API example (C++)" ${KVTIER_README_EXAMPLE})
add_executable(kvtier_readme_example ${KVTIER_README_EXAMPLE})
# Only what a user has: the public headers (through kvtier's usage requirements).
target_link_libraries(kvtier_readme_example PRIVATE kvtier)
add_test(NAME readme_example COMMAND kvtier_readme_example)
set_tests_properties(readme_example PROPERTIES TIMEOUT 60)

# --- The installed package --------------------------------------------------------------
# Installs this build into a scratch prefix, then builds the README example against it
# with find_package(kvtier) (tests/downstream/CMakeLists.txt) and with pkg-config, and
# runs both. Needs every installed target built (`ninja`/`cmake --build` first).
add_test(NAME downstream_package
  COMMAND ${CMAKE_COMMAND}
          -DBUILD_DIR=${PROJECT_BINARY_DIR}
          -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
          -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/downstream
          -DDOWNSTREAM_SOURCE_DIR=${CMAKE_CURRENT_SOURCE_DIR}/downstream
          -DEXAMPLE_SOURCE=${KVTIER_README_EXAMPLE}
          -DCONFIG=$<CONFIG>
          -DGENERATOR=${CMAKE_GENERATOR}
          -DMAKE_PROGRAM=${CMAKE_MAKE_PROGRAM}
          -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
          -DLIBDIR=${CMAKE_INSTALL_LIBDIR}
          -DINCLUDEDIR=${CMAKE_INSTALL_INCLUDEDIR}
          -DVERSION=${PROJECT_VERSION}
          -DSANITIZE=${KVTIER_SANITIZE}
          -P ${CMAKE_CURRENT_SOURCE_DIR}/downstream/run_downstream_test.cmake)
set_tests_properties(downstream_package PROPERTIES TIMEOUT 180 LABELS install)
