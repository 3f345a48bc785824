"""Platform kernels the models call: attention (dense, CPU blocked, TPU splash, GPU cuDNN), the CPU depthwise 3x3
convolution, the grouped matmul of dropless MoE and the expert-parallel token exchange."""
