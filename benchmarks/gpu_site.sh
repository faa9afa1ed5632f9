# Sourced by the GPU scripts of benchmarks/ (run from the repository root on the GPU machine):
# unpack GalSim and astropy for its Python (.whl/gpusite.tar.xz, made here by
# benchmarks/make_gpu_site.sh and carried) into /tmp/site once, and put them and the repository
# on PYTHONPATH.
if [ ! -d /tmp/site/galsim ] && [ -f .whl/gpusite.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .whl/gpusite.tar.xz -C /tmp/site
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
