# Build options for the C++ side of apd-ext.
option(APD_BUILD_TESTS "Build the host-side C++ tests (ctest)" ON)
option(APD_BUILD_CUDA "Compile the CUDA kernels into a static library" OFF)
# CUDA architectures: the rule of setup.py (python/apd_ext/_build_info.py), in
# cmake/ApdCudaArchs.cmake: APD_CUDA_ARCHS (this cache value or the environment),
# else TORCH_CUDA_ARCH_LIST ("8.0;8.6+PTX;9.0" or "80;86"), else the visible
# GPU, else sm_80, 86, 89, 90 (+ sm_100, sm_120 where nvcc lists them) and the
# PTX of the newest. Resolved only for APD_BUILD_CUDA (into APD_CUDA_ARCHITECTURES).
set(APD_CUDA_ARCHS "" CACHE STRING "CUDA architectures, e.g. \"8.0;8.6+PTX;9.0\" (empty: the rule above)")
include(ApdCudaArchs)
if(APD_BUILD_CUDA)
  apd_resolve_cuda_archs(_apd_sass _apd_ptx _apd_source)
  apd_cuda_architectures("${_apd_sass}" "${_apd_ptx}" APD_CUDA_ARCHITECTURES)
  message(STATUS "apd: CUDA architectures ${APD_CUDA_ARCHITECTURES} (${_apd_source})")
endif()
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE Release)
endif()

# One executable per tests/cpp/*.cpp, linked to apd::kernels and OpenMP, each a ctest.
function(apd_add_host_tests dir)
  find_package(OpenMP)
  file(GLOB tests CONFIGURE_DEPENDS ${dir}/*.cpp)
  foreach(src ${tests})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_link_libraries(${name} PRIVATE apd::kernels)
    if(OpenMP_CXX_FOUND)
      target_link_libraries(${name} PRIVATE OpenMP::OpenMP_CXX)
    endif()
    target_compile_options(${name} PRIVATE -Wall -Wextra)
    add_test(NAME ${name} COMMAND ${name})
  endforeach()
endfunction()
