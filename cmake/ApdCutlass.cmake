# Locate the CuTe/CUTLASS headers shipped by the nvidia-cutlass wheel
# (cutlass_library/source/include), or take APD_CUTLASS_INCLUDE_DIR as given.
if(NOT APD_CUTLASS_INCLUDE_DIR)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c
        "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
      OUTPUT_VARIABLE _apd_cutlass OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
    if(_rc EQUAL 0 AND EXISTS "${_apd_cutlass}/cute")
      set(APD_CUTLASS_INCLUDE_DIR "${_apd_cutlass}" CACHE PATH "CuTe/CUTLASS include directory")
    endif()
  endif()
endif()
if(APD_CUTLASS_INCLUDE_DIR)
  message(STATUS "apd: CuTe/CUTLASS headers in ${APD_CUTLASS_INCLUDE_DIR}")
else()
  message(STATUS "apd: CuTe/CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0)")
endif()
