# The dependency rule of DESIGN.md, checked on the #include lines:
#   kernels/   includes nothing of ours but kernels/ and the public headers;
#   storage/   and index/ may include kernels/ and src/util/, not each other, not the
#              layers above (src/core, src/server, src/client);
#   public headers (src/include/kvtier) include only standard headers and each other.
function(check_dir dir forbidden_regex)
  file(GLOB_RECURSE files ${SOURCE_DIR}/${dir}/*.h ${SOURCE_DIR}/${dir}/*.cc
       ${SOURCE_DIR}/${dir}/*.cu ${SOURCE_DIR}/${dir}/*.cuh)
  foreach(f IN LISTS files)
    file(STRINGS ${f} includes REGEX "^#include ")
    foreach(line IN LISTS includes)
      if(line MATCHES "${forbidden_regex}")
        message(SEND_ERROR "${f}: '${line}' breaks the layering rule for ${dir}/")
      endif()
    endforeach()
  endforeach()
endfunction()

check_dir(kernels "#include \"(storage|index|src|tools|bench)/")
check_dir(storage "#include \"(index|src/core|src/server|src/client|tools|bench)/")
check_dir(index "#include \"(storage|src/core|src/server|src/client|tools|bench)/")
check_dir(src/core "#include \"(src/server|src/client|tools|bench)/")
# Public headers: only <standard> headers and "kvtier/..." headers.
check_dir(src/include "#include (\"[^k]|\"k[^v]|<(cuda|rocksdb|faiss|boost|liburing|spdlog|fmt|CLI|xxhash|toml))")
