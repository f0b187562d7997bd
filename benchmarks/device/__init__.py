"""GPU bring-up: ship FFCV, DALI and the data to a bare, offline GPU machine in calls of at most 64 MiB,
install them there, and check every backend and training setting on CUDA (see README.md here)."""
