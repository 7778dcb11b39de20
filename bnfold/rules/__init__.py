"""The fold rules, one per file. Each has a pure ``match`` (or ``absorb`` for the layer rules, which compute a
layer's new parameters) that returns the computed values or raises :class:`~bnfold.rules.base.Skip`; the
planner (:mod:`bnfold.planner`) decides which applies and composes them, and :func:`bnfold.planner.apply`
carries the plan out on the ModelProto.

Backward (into the layer before the BN): :mod:`.conv_backward`, :mod:`.gemm_backward`, :mod:`.matmul_backward`,
through Concat (:mod:`.concat_backward`) and through Reshape (:mod:`.reshape_backward`). Forward (into the layer
after it): :mod:`.conv_forward`, :mod:`.gemm_forward` (Gemm/MatMul, directly or through Flatten). Per-channel
affine ops: :mod:`.affine_chain`. Lowering to Mul+Add: :mod:`.lower`.
"""
