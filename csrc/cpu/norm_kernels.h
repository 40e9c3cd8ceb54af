// Kernel-section part shared by the row norms (see cpu/norm_common.h). Not a normal header:
// no include guard and no includes, it is included from the kernel section of an op file and
// so lands in each instruction set's namespace (cpu/foreach_isa.h), with its VecFor<T>.

// out[j] for columns [j0, j1): the partial rows part[c] (nchunks of n) summed in chunk order.
template <class A, class Wt>
void norm_reduce_cols(const A* part, int64_t nchunks, int64_t n, Wt* out, int64_t j0,
                      int64_t j1) {
  using V = VecFor<A>;
  for (int64_t j = j0; j < j1; j += V::W) {
    const int64_t m = j1 - j;
    V s = V::load(part + j, m);
    for (int64_t c = 1; c < nchunks; ++c) s = s + V::load(part + c * n + j, m);
    s.store(out + j, m);
  }
}

