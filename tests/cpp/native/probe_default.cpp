#define APD_PROBE_FN apd_probe_default
#include "probe.inc"
