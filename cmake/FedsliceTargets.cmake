# Per-target build settings: warnings, ISA and sanitizers are attached to FedSlice's own
# targets only, never to global flags, so that they do not leak into dependencies.

add_library(fedslice_build_flags INTERFACE)
target_compile_options(fedslice_build_flags INTERFACE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic>
  # GCC 12 reports false 'may be used uninitialized' warnings inside its own
  # avx512fintrin.h when Eigen's AVX-512 kernels are inlined (GCC bug 105593, fixed in 13).
  $<$<AND:$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,13>>:-Wno-maybe-uninitialized>)
if(FEDSLICE_ARCH)
  target_compile_options(fedslice_build_flags INTERFACE -march=${FEDSLICE_ARCH})
endif()
if(FEDSLICE_SANITIZE STREQUAL "address")
  target_compile_options(fedslice_build_flags INTERFACE
    -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  target_link_options(fedslice_build_flags INTERFACE -fsanitize=address,undefined)
elseif(FEDSLICE_SANITIZE STREQUAL "thread")
  # Asio's headers use std::atomic_thread_fence, which GCC 12's -Wtsan flags as unsupported
  # by TSan; the warning is about the library, not our code.
  target_compile_options(fedslice_build_flags INTERFACE -fsanitize=thread -fno-omit-frame-pointer
    $<$<CXX_COMPILER_ID:GNU>:-Wno-tsan>)
  target_link_options(fedslice_build_flags INTERFACE -fsanitize=thread)
elseif(FEDSLICE_SANITIZE)
  message(FATAL_ERROR "FEDSLICE_SANITIZE must be '', 'address' or 'thread'")
endif()

# fedslice_module(<name> [DEPS ...]): one library per module, sources under <name>/src,
# public headers under <name>/include/fedslice/<name>/, alias fedslice::<name>.
function(fedslice_module name)
  cmake_parse_arguments(ARG "" "" "DEPS;PRIVATE_DEPS" ${ARGN})
  file(GLOB_RECURSE sources CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/src/*.cc")
  if(NOT sources)
    # A module whose sources have not landed yet is header-only until they do.
    add_library(fedslice_${name} INTERFACE)
    add_library(fedslice::${name} ALIAS fedslice_${name})
    target_include_directories(fedslice_${name} INTERFACE
      $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>)
    target_link_libraries(fedslice_${name} INTERFACE ${ARG_DEPS})
    return()
  endif()
  add_library(fedslice_${name} ${sources})
  add_library(fedslice::${name} ALIAS fedslice_${name})
  target_include_directories(fedslice_${name} PUBLIC
    $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>)
  target_include_directories(fedslice_${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(fedslice_${name} PUBLIC ${ARG_DEPS} fedslice_build_flags
    PRIVATE ${ARG_PRIVATE_DEPS})
endfunction()

# fedslice_test(<name> DEPS ...): one GoogleTest binary from every *_test.cc in the folder.
function(fedslice_test name)
  cmake_parse_arguments(ARG "SERIAL" "TIMEOUT" "DEPS;LABELS" ${ARGN})
  file(GLOB sources CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/*_test.cc")
  if(NOT sources)
    return()
  endif()
  add_executable(${name} ${sources})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} fedslice_testing GTest::gtest GTest::gtest_main
    GTest::gmock fedslice_build_flags)
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  # SERIAL tests (training, multi-process) use every core: CTest runs them alone.
  set(serial FALSE)
  if(ARG_SERIAL)
    set(serial TRUE)
  endif()
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60
    PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS "${ARG_LABELS}" RUN_SERIAL ${serial}
    ENVIRONMENT "FEDSLICE_SOURCE_DIR=${PROJECT_SOURCE_DIR};FEDSLICE_BINARY_DIR=${PROJECT_BINARY_DIR}")
endfunction()
