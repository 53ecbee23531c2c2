# Sourced by the device scripts from the repository root on the GPU machine: the CUDA libraries, the kernel cache
# and the fixture models' paths, then what tools/device/build.sh carried in .device/set.tgz unpacked into .device/,
# and the kernels an earlier call compiled (cubin.tgz, in the set when build.sh found one) into an empty cache.
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PIPEMOE_KERNEL_CACHE="${PIPEMOE_KERNEL_CACHE:-/tmp/pipemoe-cubin}" PIPEMOE_MODELS_DIR="$PWD/data/models"
if [ -f .device/set.tgz ]; then
    tar xzf .device/set.tgz -C .device && rm .device/set.tgz
fi
if [ -f .device/cubin.tgz ] && [ ! -d "$PIPEMOE_KERNEL_CACHE" ]; then
    mkdir -p "$PIPEMOE_KERNEL_CACHE" && tar xzf .device/cubin.tgz -C "$PIPEMOE_KERNEL_CACHE" --strip-components 1
fi
