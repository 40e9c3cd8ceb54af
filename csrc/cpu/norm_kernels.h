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

// The backward's row groups of chunk c (`chunk` rows per chunk) in a task that ends before
// chunk c1: f(std::integral_constant<int, g>{}, r, nr) for the g rows from row r, g = G while
// G rows are left in the chunk, then 1; nr is a row to prefetch meanwhile (the next group's
// first, or the task's last row).
template <int G, class F>
inline void norm_row_groups(int64_t rows, int64_t chunk, int64_t c, int64_t c1, F&& f) {
  const int64_t rend = std::min(rows, (c + 1) * chunk);
  const int64_t last = std::min(rows, c1 * chunk) - 1;  // last row of this task
  for (int64_t r = c * chunk; r < rend;) {
    if (rend - r >= G) {
      f(std::integral_constant<int, G>{}, r, std::min(r + G, last));
      r += G;
    } else {
      f(std::integral_constant<int, 1>{}, r, std::min(r + 1, last));
      ++r;
    }
  }
}
