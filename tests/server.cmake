# kvtierd's serving core: the frame reader, the handshake check and the Server end to
# end through raw sockets (a test client built from the protocol files).
add_executable(kvtier_server_tests
  server_frame_reader_test.cc
  server_handshake_test.cc
  server_test.cc
  server_device_test.cc
)
target_include_directories(kvtier_server_tests PRIVATE ${PROJECT_SOURCE_DIR} ${KVTIER_GENERATED_DIR})
target_include_directories(kvtier_server_tests SYSTEM PRIVATE ${KVTIER_FLATBUFFERS_INCLUDE_DIR})
add_dependencies(kvtier_server_tests kvtier_protocol_header)
target_link_libraries(kvtier_server_tests PRIVATE kvtier_server kvtier GTest::gtest GTest::gtest_main)
gtest_discover_tests(kvtier_server_tests DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 120)
