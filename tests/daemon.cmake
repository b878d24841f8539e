# kvtierd as a program: its config and metrics (in-process), the binary as a process
# (start, SIGTERM, SIGKILL under load, killed clients, eight clients at once), and the
# README's sidecar example against a running kvtierd. Included by tests/CMakeLists.txt.
if(TARGET kvtierd AND TARGET kvtier_cli)
  add_executable(kvtier_daemon_tests daemon_config_test.cc daemon_process_test.cc)
  target_include_directories(kvtier_daemon_tests PRIVATE ${PROJECT_SOURCE_DIR}
                                                         ${KVTIER_GENERATED_DIR})
  target_link_libraries(kvtier_daemon_tests PRIVATE kvtier_daemon kvtier_server kvtier
                                                    GTest::gtest GTest::gtest_main)
  target_compile_definitions(kvtier_daemon_tests PRIVATE
    KVTIER_SOURCE_DIR="${PROJECT_SOURCE_DIR}" KVTIER_KVTIERD="$<TARGET_FILE:kvtierd>"
    KVTIER_TOOL="$<TARGET_FILE:kvtier_cli>")
  add_dependencies(kvtier_daemon_tests kvtierd kvtier_cli)
  gtest_discover_tests(kvtier_daemon_tests DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 180)

  # A client's GPU tier fed by a kvtierd process (CUDA IPC with a GPU, the emulated tier
  # without): its own program, small enough to bundle for a GPU host (../shared/gpu).
  add_executable(kvtier_daemon_gpu_tests daemon_gpu_test.cc)
  target_include_directories(kvtier_daemon_gpu_tests PRIVATE ${PROJECT_SOURCE_DIR}
                                                             ${KVTIER_GENERATED_DIR})
  target_link_libraries(kvtier_daemon_gpu_tests PRIVATE kvtier_server kvtier GTest::gtest
                                                        GTest::gtest_main)
  target_compile_definitions(kvtier_daemon_gpu_tests PRIVATE
    KVTIER_KVTIERD="$<TARGET_FILE:kvtierd>")
  add_dependencies(kvtier_daemon_gpu_tests kvtierd)
  gtest_discover_tests(kvtier_daemon_gpu_tests DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 180)

  set(KVTIER_SIDECAR_EXAMPLE ${CMAKE_CURRENT_BINARY_DIR}/readme_example/sidecar_example.cc)
  kvtier_readme_example("## Running the sidecar" ${KVTIER_SIDECAR_EXAMPLE})
  add_executable(kvtier_sidecar_example ${KVTIER_SIDECAR_EXAMPLE})
  target_link_libraries(kvtier_sidecar_example PRIVATE kvtier)
  add_test(NAME sidecar_example
    COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/sidecar_example_test.sh $<TARGET_FILE:kvtierd>
            $<TARGET_FILE:kvtier_sidecar_example>)
  set_tests_properties(sidecar_example PROPERTIES TIMEOUT 120)
  # The C API's loans (kvtier_borrow, kvtier_reserve) through a running kvtierd.
  if(TARGET kvtier_c_api_test)
    add_test(NAME c_api_sidecar
      COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/sidecar_example_test.sh $<TARGET_FILE:kvtierd>
              $<TARGET_FILE:kvtier_c_api_test> 0)
    set_tests_properties(c_api_sidecar PROPERTIES TIMEOUT 120)
  endif()
endif()
