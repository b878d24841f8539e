# The kvtierd client (src/client, kvtier/client.h): against the daemon's serving core run
# in-process (kvtier_server, src/server), and against a scripted fake daemon. Included by
# tests/CMakeLists.txt.
if(TARGET kvtier_server)
  add_executable(kvtier_client_tests
    client_store_test.cc
    store_lend_test.cc
    client_reconnect_test.cc
    client_fake_daemon_test.cc
    client_device_test.cc)
  add_dependencies(kvtier_client_tests kvtier_protocol_header)
  target_include_directories(kvtier_client_tests PRIVATE ${PROJECT_SOURCE_DIR}
                                                         ${KVTIER_GENERATED_DIR})
  target_include_directories(kvtier_client_tests SYSTEM PRIVATE ${KVTIER_FLATBUFFERS_INCLUDE_DIR})
  target_link_libraries(kvtier_client_tests PRIVATE kvtier kvtier_server GTest::gtest
                                                    GTest::gtest_main)
  # Label tsan: run by the ThreadSanitizer phase of tools/test.sh.
  gtest_discover_tests(kvtier_client_tests DISCOVERY_TIMEOUT 60
                       PROPERTIES TIMEOUT 120 LABELS tsan)
endif()
