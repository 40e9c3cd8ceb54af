// Kernel-section part of the gated activations (see cpu/gated_activation.h). Not a normal
// header: no include guard and no includes, it is included from the kernel section of an op
// file and so lands in each instruction set's namespace (cpu/foreach_isa.h), with that
// namespace's VecFor<T>. The op then specialises GatedAct<Key> there:
//   template <class V, class A> static V fwd(const V& g);       act(g)
//   template <class V, class A> static void bwd(const V& y, const V& g, const V& u, V& dg, V& du);
//                                                                 dg = y u act'(g), du = y act(g)
// V the vector type, A its lanes' type (float, or double for double).

template <class Key>
struct GatedAct;

// The tasks from t0 on: task t covers row r = t / nb, columns [c0, c0 + len) = [b * block,
// min(n, (b + 1) * block)), b = t % nb. (A cursor, not a loop taking a lambda: moving the
// loop bodies into lambdas changed what GCC contracts into FMAs in the float64 ArrayVec code,
// and with it the last bits of float64 results.)
struct GatedTasks {
  int64_t n, block, nb, r, b;
  GatedTasks(int64_t n_, int64_t block_, int64_t t0)
      : n(n_), block(block_), nb((n_ + block_ - 1) / block_), r(t0 / nb), b(t0 % nb) {}
  int64_t c0() const { return b * block; }
  int64_t len() const { return std::min(n, c0() + block) - c0(); }
  void next() {
    if (++b == nb) {
      b = 0;
      ++r;
    }
  }
};

// in: gate, up; out: act(gate) * up, rows `ostride` elements apart.
template <class T, class Key>
void gated_fwd_tasks(const TaskIn<T>* in, T* const* out, int64_t ostride, int64_t n, int64_t block,
                     int64_t t0, int64_t t1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  GatedTasks task(n, block, t0);
  for (int64_t t = t0; t < t1; ++t, task.next()) {
    const int64_t r = task.r, c0 = task.c0(), len = task.len();
    const T* gr = in[0].p + r * in[0].stride + c0;
    const T* ur = in[1].p + r * in[1].stride + c0;
    T* orow = out[0] + r * ostride + c0;
    for (int64_t i = 0; i < len; i += V::W) {
      const int64_t m = len - i;
      const V act = GatedAct<Key>::template fwd<V, A>(V::load(gr + i, m));
      (act * V::load(ur + i, m)).store(orow + i, m);
    }
  }
}

// in: dy, gate, up; out: dgate, dup, rows `ostride` elements apart (n, or 2n for the two halves
// of one packed [dgate | dup] buffer).
template <class T, class Key>
void gated_bwd_tasks(const TaskIn<T>* in, T* const* out, int64_t ostride, int64_t n, int64_t block,
                     int64_t t0, int64_t t1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  GatedTasks task(n, block, t0);
  for (int64_t t = t0; t < t1; ++t, task.next()) {
    const int64_t r = task.r, c0 = task.c0(), len = task.len();
    const T* yr = in[0].p + r * in[0].stride + c0;
    const T* gr = in[1].p + r * in[1].stride + c0;
    const T* ur = in[2].p + r * in[2].stride + c0;
    T* dgr = out[0] + r * ostride + c0;
    T* dur = out[1] + r * ostride + c0;
    for (int64_t i = 0; i < len; i += V::W) {
      const int64_t m = len - i;
      V dgv, duv;
      GatedAct<Key>::template bwd<V, A>(V::load(yr + i, m), V::load(gr + i, m), V::load(ur + i, m),
                                         dgv, duv);
      duv.store(dur + i, m);
      dgv.store(dgr + i, m);
    }
  }
}
