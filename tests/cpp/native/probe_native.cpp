#define APD_PROBE_FN apd_probe_native
#include "probe.inc"
