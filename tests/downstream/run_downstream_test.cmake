# The installed-package test (ctest -R downstream), run with cmake -P:
#   1. `cmake --install BUILD_DIR --prefix WORK_DIR/prefix`, and check what landed there;
#   2. configure, build and run DOWNSTREAM_SOURCE_DIR (find_package(kvtier) through
#      CMAKE_PREFIX_PATH) with EXAMPLE_SOURCE, the README's API example;
#   3. compile EXAMPLE_SOURCE with CXX_COMPILER and `pkg-config --cflags --libs kvtier`
#      (PKG_CONFIG_PATH = the prefix's pkgconfig folder), and run it.
# Any failed step fails the test with the step's output. LD_LIBRARY_PATH is cleared, so
# the programs find libkvtier.so only through the prefix (their RUNPATH).
#
# Variables (-D): BUILD_DIR, SOURCE_DIR (kvtier's source), WORK_DIR, DOWNSTREAM_SOURCE_DIR,
# EXAMPLE_SOURCE, CONFIG, GENERATOR, MAKE_PROGRAM, CXX_COMPILER, LIBDIR, INCLUDEDIR
# (relative install directories), VERSION, SANITIZE (KVTIER_SANITIZE, may be empty).
cmake_minimum_required(VERSION 3.25)

foreach(var IN ITEMS BUILD_DIR SOURCE_DIR WORK_DIR DOWNSTREAM_SOURCE_DIR EXAMPLE_SOURCE
                     GENERATOR CXX_COMPILER LIBDIR INCLUDEDIR VERSION)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_downstream_test.cmake: -D${var}=... is required")
  endif()
endforeach()
foreach(dir IN ITEMS LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${${dir}}")
    message(FATAL_ERROR "CMAKE_INSTALL_${dir} is absolute (${${dir}}): "
                        "the package cannot be installed into another prefix")
  endif()
endforeach()

# step(<name> <command>...): runs the command; fails the test with its output if it fails.
# The output is left in step_output.
function(step name)
  string(TIMESTAMP start "%s")
  execute_process(COMMAND ${ARGN}
                  RESULT_VARIABLE rc
                  OUTPUT_VARIABLE output
                  ERROR_VARIABLE output)
  string(TIMESTAMP end "%s")
  math(EXPR seconds "${end} - ${start}")
  if(NOT rc STREQUAL "0")
    list(JOIN ARGN " " command)
    message(FATAL_ERROR "downstream: ${name} FAILED (${rc})\n  command: ${command}\n${output}")
  endif()
  message(STATUS "downstream: ${name}: ok (${seconds} s)")
  set(step_output "${output}" PARENT_SCOPE)
endfunction()

set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
unset(ENV{DESTDIR})          # would send the install elsewhere
unset(ENV{LD_LIBRARY_PATH})  # the prefix alone must provide libkvtier.so
unset(ENV{CMAKE_PREFIX_PATH})
unset(ENV{PKG_CONFIG_PATH})
set(sanitize_flags)
if(SANITIZE)
  # A sanitized libkvtier needs its runtime linked into the program first.
  set(sanitize_flags -fsanitize=${SANITIZE})
endif()

# --- 1. Install --------------------------------------------------------------------------
set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
step("install into ${prefix}" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix}
     ${config_args})
foreach(file IN ITEMS ${INCLUDEDIR}/kvtier/store.h ${INCLUDEDIR}/kvtier/kvtier_c.h
                      ${LIBDIR}/libkvtier.so ${LIBDIR}/cmake/kvtier/kvtierConfig.cmake
                      ${LIBDIR}/cmake/kvtier/kvtierConfigVersion.cmake
                      ${LIBDIR}/cmake/kvtier/kvtierTargets.cmake
                      ${LIBDIR}/pkgconfig/kvtier.pc)
  if(NOT EXISTS ${prefix}/${file})
    message(FATAL_ERROR "downstream: the install has no ${file}")
  endif()
endforeach()
# Exactly the public headers are installed: no internal header leaks into the package.
file(GLOB public_headers RELATIVE ${SOURCE_DIR}/src/include/kvtier
     ${SOURCE_DIR}/src/include/kvtier/*)
file(GLOB_RECURSE installed_headers RELATIVE ${prefix}/${INCLUDEDIR}/kvtier
     ${prefix}/${INCLUDEDIR}/kvtier/*)
list(SORT public_headers)
list(SORT installed_headers)
if(NOT public_headers STREQUAL installed_headers)
  message(FATAL_ERROR "downstream: installed headers (${installed_headers}) differ from "
                      "src/include/kvtier (${public_headers})")
endif()

# Fails unless `program` loads libkvtier.so from the prefix (checked with ldd when present).
function(check_loads_from_prefix program)
  find_program(LDD ldd)
  if(NOT LDD)
    return()
  endif()
  execute_process(COMMAND ${LDD} ${program} OUTPUT_VARIABLE libs ERROR_VARIABLE libs)
  string(REGEX MATCH "libkvtier\\.so[^\n]*=> *([^ \n]+)" line "${libs}")
  set(loaded "${CMAKE_MATCH_1}")
  file(REAL_PATH "${prefix}/${LIBDIR}" expected_dir)
  if(loaded STREQUAL "" OR NOT EXISTS "${loaded}")
    message(FATAL_ERROR "downstream: ${program} does not find libkvtier.so:\n${libs}")
  endif()
  file(REAL_PATH "${loaded}" loaded)
  get_filename_component(loaded_dir "${loaded}" DIRECTORY)
  if(NOT loaded_dir STREQUAL expected_dir)
    message(FATAL_ERROR "downstream: ${program} loads ${loaded}, not the one in ${expected_dir}")
  endif()
endfunction()

# --- 2. CMake: find_package(kvtier) --------------------------------------------------------
set(generator_args -G ${GENERATOR})
if(MAKE_PROGRAM)
  list(APPEND generator_args -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
set(cxx_flags_args)
if(SANITIZE)
  list(APPEND cxx_flags_args "-DCMAKE_CXX_FLAGS=${sanitize_flags}"
                             "-DCMAKE_EXE_LINKER_FLAGS=${sanitize_flags}")
endif()
step("configure the find_package project" ${CMAKE_COMMAND}
     -S ${DOWNSTREAM_SOURCE_DIR} -B ${WORK_DIR}/cmake-build ${generator_args}
     -DCMAKE_BUILD_TYPE=Release
     -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
     -DCMAKE_PREFIX_PATH=${prefix}
     -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
     -DKVTIER_EXPECTED_PREFIX=${prefix}
     -DKVTIER_EXPECTED_VERSION=${VERSION}
     -DKVTIER_EXAMPLE_SOURCE=${EXAMPLE_SOURCE}
     ${cxx_flags_args})
step("build the find_package project" ${CMAKE_COMMAND} --build ${WORK_DIR}/cmake-build
     --config Release)
check_loads_from_prefix(${WORK_DIR}/cmake-build/app)
step("run the find_package build" ${WORK_DIR}/cmake-build/app)
message(STATUS "  ${step_output}")

# --- 3. pkg-config -------------------------------------------------------------------------
find_program(PKG_CONFIG NAMES pkg-config pkgconf REQUIRED)
set(ENV{PKG_CONFIG_PATH} ${prefix}/${LIBDIR}/pkgconfig)
step("pkg-config --modversion" ${PKG_CONFIG} --modversion kvtier)
string(STRIP "${step_output}" pc_version)
if(NOT pc_version STREQUAL VERSION)
  message(FATAL_ERROR "downstream: kvtier.pc says version '${pc_version}', expected ${VERSION}")
endif()
# The .pc file is relocatable: its directories resolve into the prefix it was copied to.
foreach(pair IN ITEMS "includedir:${INCLUDEDIR}" "libdir:${LIBDIR}")
  string(REPLACE ":" ";" pair "${pair}")
  list(GET pair 0 variable)
  list(GET pair 1 relative)
  step("pkg-config --variable=${variable}" ${PKG_CONFIG} --variable=${variable} kvtier)
  string(STRIP "${step_output}" dir)
  if(NOT IS_DIRECTORY "${dir}")
    message(FATAL_ERROR "downstream: kvtier.pc's ${variable} '${dir}' is not a directory")
  endif()
  file(REAL_PATH "${dir}" dir)
  file(REAL_PATH "${prefix}/${relative}" expected)
  if(NOT dir STREQUAL expected)
    message(FATAL_ERROR "downstream: kvtier.pc's ${variable} is ${dir}, expected ${expected}")
  endif()
endforeach()
step("pkg-config --cflags --libs" ${PKG_CONFIG} --cflags --libs kvtier)
string(STRIP "${step_output}" pc_flags)
separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
step("compile with pkg-config flags" ${CXX_COMPILER} -std=c++20 ${sanitize_flags}
     ${EXAMPLE_SOURCE} -o ${WORK_DIR}/app-pkgconfig ${pc_flags}
     -Wl,-rpath,${prefix}/${LIBDIR})
check_loads_from_prefix(${WORK_DIR}/app-pkgconfig)
step("run the pkg-config build" ${WORK_DIR}/app-pkgconfig)
message(STATUS "  ${step_output}")
