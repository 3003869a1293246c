"""A generated corpus whose best achievable loss is known: documents drawn from a Markov chain.

Owns: ``MarkovChain`` (a row-stochastic transition matrix, its stationary distribution and
exact entropy rate in nats/token, the cross-entropy the true chain scores on a sample, and
vectorised sampling), ``document_chain`` (a token chain with an end-of-document state), and
``load_markov`` (the ``LMData`` of one such chain: the same on every machine for the same
parameters, independent of the run seed).

Must not import: torch, ray, pandas.

Why the floor is exact. Tokens 0..V-1 follow a random transition matrix P (rows drawn from a
symmetric Dirichlet(concentration): small values give peaked, low-entropy rows). After each
token the document ends with probability p = 1 / mean_doc_tokens (geometric lengths), and an
end token EOT = V is emitted; the next document starts from P's stationary distribution. That
is itself a Markov chain Q on V + 1 states, and the corpus is one sample path of Q started at
EOT. The model always sees the previous token (a window's targets are preceded by their
inputs; a document's first target by EOT), so no predictor can beat Q's conditional
distribution; its expected loss per target is Q's entropy rate
    H = sum_s mu_s * H(Q[s, :]),   mu the stationary distribution of Q (mu Q = mu),
in packed windows and in length-bucketed documents alike. On a finite sample the true chain
scores ``cross_entropy`` (which converges to H); a trained model's validation loss minus that
is its excess over the best possible.
"""

from __future__ import annotations

import hashlib

import numpy as np

from bench.lm.corpus import LMData, TokenStream

DOCS_PER_CHUNK = 4096  # documents drawn side by side (vectorised over documents)
MARKOV_STREAM = 0x4D41524B  # "MARK": this module's own random stream, apart from any run seed


def entropy_nats(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of a distribution matrix, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=-1)


class MarkovChain:
    """A finite chain on states 0..S-1 with transition matrix ``transition`` (rows sum to 1)."""

    def __init__(self, transition: np.ndarray) -> None:
        q = np.asarray(transition, dtype=np.float64)
        if q.ndim != 2 or q.shape[0] != q.shape[1] or (q < 0).any() or not np.allclose(q.sum(1), 1.0):
            raise ValueError(f"transition must be a square row-stochastic matrix, got shape {q.shape}")
        self.transition = q
        self.num_states = q.shape[0]
        cdf = np.cumsum(q, axis=1)
        cdf[:, -1] = 1.0  # rounding must never leave a uniform draw above the last bin
        self._cdf = cdf

    def stationary(self) -> np.ndarray:
        """mu with mu Q = mu and sum(mu) = 1 (the unique one for an irreducible chain)."""
        s = self.num_states
        # (Q^T - I) mu = 0 with the normalisation appended; least squares solves it exactly.
        a = np.vstack([self.transition.T - np.eye(s), np.ones((1, s))])
        b = np.zeros(s + 1)
        b[-1] = 1.0
        mu = np.linalg.lstsq(a, b, rcond=None)[0]
        mu = np.clip(mu, 0.0, None)
        return mu / mu.sum()

    def entropy_rate(self) -> float:
        """Expected nats per step of the chain in its stationary regime."""
        return float(self.stationary() @ entropy_nats(self.transition))

    def cross_entropy(self, path: np.ndarray) -> float:
        """Mean -log Q[prev, next] over the consecutive pairs of a sample path: the loss the
        true chain scores on the same targets a model is evaluated on."""
        path = np.asarray(path, dtype=np.int64)
        return float(-np.log(self.transition[path[:-1], path[1:]]).mean())

    def step(self, states: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One transition of each of many paths (inverse CDF, side by side)."""
        u = rng.random(len(states))
        return (self._cdf[states] < u[:, None]).sum(axis=1)


def random_transition(num_states: int, concentration: float, rng: np.random.Generator) -> np.ndarray:
    """Rows drawn from a symmetric Dirichlet(concentration) (strictly positive: irreducible)."""
    if num_states < 2 or not concentration > 0:
        raise ValueError(f"need num_states >= 2 and concentration > 0, got {num_states}, {concentration}")
    p = rng.dirichlet(np.full(num_states, concentration), size=num_states)
    p = np.maximum(p, 1e-12)  # a Dirichlet draw can underflow to 0; keep every transition possible
    return p / p.sum(axis=1, keepdims=True)


def document_chain(tokens: MarkovChain, end_prob: float) -> MarkovChain:
    """The chain on tokens 0..V-1 plus EOT = V: after a token, EOT with probability end_prob,
    else the next token from the token chain; after EOT, a token from its stationary law."""
    if not 0.0 < end_prob < 1.0:
        raise ValueError(f"end_prob must be in (0, 1), got {end_prob}")
    v = tokens.num_states
    q = np.zeros((v + 1, v + 1))
    q[:v, :v] = (1.0 - end_prob) * tokens.transition
    q[:v, v] = end_prob
    q[v, :v] = tokens.stationary()
    return MarkovChain(q)


def sample_documents(tokens: MarkovChain, end_prob: float, num_tokens: int, rng: np.random.Generator,
                     docs_per_chunk: int = DOCS_PER_CHUNK) -> np.ndarray:
    """``num_tokens`` tokens of ``document_chain(tokens, end_prob)`` started after an EOT (EOT =
    tokens.num_states), drawn document by document: under that chain the documents are
    independent, each with Geometric(end_prob) tokens (the end never depends on the tokens),
    a first token from the stationary law and the rest from the token chain. Documents are
    drawn a chunk at a time, side by side, then joined with EOTs; the stream is then cut to the
    length asked for. (Cutting independent paths at their last EOT instead would drop the
    documents longer than a path: a bias towards short documents.)"""
    eot, first = tokens.num_states, tokens.stationary()
    parts, have = [], 0
    while have < num_tokens:
        # enough documents for what is still missing (a few more: lengths vary), at most a chunk
        count = min(docs_per_chunk, int((num_tokens - have) * end_prob * 1.1) + 16)
        lengths = rng.geometric(end_prob, size=count)
        rows = np.full((count, int(lengths.max()) + 1), eot, dtype=np.int64)
        rows[:, 0] = rng.choice(tokens.num_states, size=count, p=first)
        for t in range(1, int(lengths.max())):
            active = np.flatnonzero(lengths > t)
            rows[active, t] = tokens.step(rows[active, t - 1], rng)
        keep = np.arange(rows.shape[1])[None, :] <= lengths[:, None]  # each document and its EOT
        parts.append(rows[keep])
        have += parts[-1].shape[0]
    return np.concatenate(parts)[:num_tokens].astype(np.uint16 if eot < 1 << 16 else np.uint32)


def markov_token_chain(num_states: int = 32, concentration: float = 0.2, chain_seed: int = 0) -> MarkovChain:
    """The token chain of ``load_markov``: a function of its parameters only (never of a run
    seed), so a test can rebuild the chain that generated a corpus and score it."""
    rng = np.random.default_rng([chain_seed, MARKOV_STREAM, 0])
    return MarkovChain(random_transition(num_states, concentration, rng))


def load_markov(num_states: int = 32, concentration: float = 0.2, mean_doc_tokens: int = 64,
                num_train_tokens: int = 1_000_000, num_val_tokens: int = 100_000, chain_seed: int = 0) -> LMData:
    """The generated corpus: vocabulary num_states + 1 (EOT = num_states), floor = the entropy
    rate of ``document_chain(markov_token_chain(...), 1 / mean_doc_tokens)``. Train and
    validation are independent samples."""
    if mean_doc_tokens < 2:
        raise ValueError(f"mean_doc_tokens must be >= 2, got {mean_doc_tokens}")
    tokens, end_prob, eot = markov_token_chain(num_states, concentration, chain_seed), 1.0 / mean_doc_tokens, num_states
    rng = np.random.default_rng([chain_seed, MARKOV_STREAM, 1])
    # ~10 mean lengths per row covers the longest of a chunk (P(len > 10 mean) = e^-10); 4 M cells a chunk
    per_chunk = int(np.clip(2**22 // (10 * mean_doc_tokens), 64, DOCS_PER_CHUNK))
    train = TokenStream(sample_documents(tokens, end_prob, num_train_tokens, rng, per_chunk), eot)
    val = TokenStream(sample_documents(tokens, end_prob, num_val_tokens, rng, per_chunk), eot)
    digest = hashlib.sha256((train.sha256() + val.sha256()).encode()).hexdigest()
    return LMData(
        name="markov", train=train, val=val, vocab_size=num_states + 1, eot_token=eot,
        description=(f"generated: {num_states}-token Markov chain, Dirichlet({concentration}) rows, "
                     f"documents of mean {mean_doc_tokens} tokens, chain_seed {chain_seed}"),
        licence="generated (no licence needed)",
        entropy_floor_nats=document_chain(tokens, end_prob).entropy_rate(), sha256=digest)
