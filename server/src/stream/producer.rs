//! Idempotent producers (spec 5.2.1): epoch fencing and per-epoch sequence numbers.

use crate::storage::ProducerState;

/// A producer's request headers, already parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerRequest {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

/// What to do with a producer request that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// New data: store it and move the producer to this state.
    Accept(ProducerState),
    /// Already stored: answer 204 with the highest accepted sequence.
    Duplicate { epoch: u64, highest_seq: u64 },
}

/// Why a producer request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProducerError {
    #[error("producer epoch {sent} is older than the current epoch {current}")]
    StaleEpoch { sent: u64, current: u64 },
    #[error("a new producer epoch must start at Producer-Seq 0, got {seq}")]
    NewEpochNonZeroSeq { seq: u64 },
    #[error("producer sequence gap: expected {expected}, received {received}")]
    Gap { expected: u64, received: u64 },
}

/// Applies the validation table of spec 5.2.1.
pub fn check(
    state: Option<ProducerState>,
    req: &ProducerRequest,
) -> Result<Verdict, ProducerError> {
    let Some(state) = state else {
        return if req.seq == 0 {
            Ok(Verdict::Accept(ProducerState {
                epoch: req.epoch,
                last_seq: 0,
                last_ms: 0,
            }))
        } else {
            Err(ProducerError::Gap {
                expected: 0,
                received: req.seq,
            })
        };
    };
    if req.epoch < state.epoch {
        return Err(ProducerError::StaleEpoch {
            sent: req.epoch,
            current: state.epoch,
        });
    }
    if req.epoch > state.epoch {
        return if req.seq == 0 {
            Ok(Verdict::Accept(ProducerState {
                epoch: req.epoch,
                last_seq: 0,
                last_ms: 0,
            }))
        } else {
            Err(ProducerError::NewEpochNonZeroSeq { seq: req.seq })
        };
    }
    if req.seq <= state.last_seq {
        return Ok(Verdict::Duplicate {
            epoch: state.epoch,
            highest_seq: state.last_seq,
        });
    }
    // `seq > last_seq` here, so `last_seq + 1` cannot overflow.
    let expected = state.last_seq + 1;
    if req.seq == expected {
        Ok(Verdict::Accept(ProducerState {
            epoch: state.epoch,
            last_seq: req.seq,
            last_ms: 0,
        }))
    } else {
        Err(ProducerError::Gap {
            expected,
            received: req.seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(epoch: u64, seq: u64) -> ProducerRequest {
        ProducerRequest {
            id: "p".into(),
            epoch,
            seq,
        }
    }

    fn st(epoch: u64, last_seq: u64) -> Option<ProducerState> {
        Some(ProducerState {
            epoch,
            last_seq,
            last_ms: 0,
        })
    }

    #[test]
    fn first_request_must_be_seq_zero() {
        assert_eq!(
            check(None, &req(3, 0)),
            Ok(Verdict::Accept(ProducerState {
                epoch: 3,
                last_seq: 0,
                last_ms: 0
            }))
        );
        assert_eq!(
            check(None, &req(0, 1)),
            Err(ProducerError::Gap {
                expected: 0,
                received: 1
            })
        );
    }

    #[test]
    fn epochs_fence_and_restart() {
        assert_eq!(
            check(st(2, 5), &req(1, 6)),
            Err(ProducerError::StaleEpoch {
                sent: 1,
                current: 2
            })
        );
        assert_eq!(
            check(st(2, 5), &req(3, 1)),
            Err(ProducerError::NewEpochNonZeroSeq { seq: 1 })
        );
        assert_eq!(
            check(st(2, 5), &req(3, 0)),
            Ok(Verdict::Accept(ProducerState {
                epoch: 3,
                last_seq: 0,
                last_ms: 0
            }))
        );
    }

    #[test]
    fn sequences_dedupe_accept_and_detect_gaps() {
        assert_eq!(
            check(st(1, 5), &req(1, 3)),
            Ok(Verdict::Duplicate {
                epoch: 1,
                highest_seq: 5
            })
        );
        assert_eq!(
            check(st(1, 5), &req(1, 5)),
            Ok(Verdict::Duplicate {
                epoch: 1,
                highest_seq: 5
            })
        );
        assert_eq!(
            check(st(1, 5), &req(1, 6)),
            Ok(Verdict::Accept(ProducerState {
                epoch: 1,
                last_seq: 6,
                last_ms: 0
            }))
        );
        assert_eq!(
            check(st(1, 5), &req(1, 8)),
            Err(ProducerError::Gap {
                expected: 6,
                received: 8
            })
        );
    }
}
