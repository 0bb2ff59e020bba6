//! Beam search over any autoregressive decoder, as fairseq and Hugging Face run it for sequence-to-
//! sequence models (the TBT recipe decodes with beam 4): each step extends every live hypothesis by every
//! token, keeps the 2·beam best extensions by total log-probability, moves those that end in EOS to the
//! finished set (scored by total log-probability / length^length_penalty) and continues with the best
//! `beam` others. The search stops once `beam` hypotheses have finished and no live one can still beat the
//! worst of them, or at `max_len`, where the live hypotheses finish as they are.

use trit::{Error, Result};

/// How to search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamConfig {
    pub beam: usize,
    /// Generated tokens at most (EOS included).
    pub max_len: usize,
    /// Exponent of the length normalisation (1.0: mean log-probability per token; 0: none).
    pub length_penalty: f32,
    pub eos: u32,
}

/// A finished hypothesis: the generated tokens (without the prompt; ending in EOS unless cut at
/// `max_len`) and its normalised score.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f32,
}

fn normalised(logp: f32, len: usize, penalty: f32) -> f32 {
    logp / (len.max(1) as f32).powf(penalty)
}

/// Runs beam search. `step` receives the live hypotheses' generated tokens so far (one slice per beam,
/// all of one length) and returns each one's log-probabilities over the vocabulary for the next token.
/// Returns the finished hypotheses, best first.
pub fn search(
    cfg: BeamConfig,
    mut step: impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Hypothesis>> {
    if cfg.beam == 0 || cfg.max_len == 0 {
        return Err(Error::Msg(format!(
            "beam search needs beam ≥ 1 and max_len ≥ 1, got {} and {}",
            cfg.beam, cfg.max_len
        )));
    }
    let mut live: Vec<(Vec<u32>, f32)> = vec![(Vec::new(), 0.0)];
    let mut done: Vec<Hypothesis> = Vec::new();
    for len in 1..=cfg.max_len {
        let prefixes: Vec<Vec<u32>> = live.iter().map(|(t, _)| t.clone()).collect();
        let logps = step(&prefixes)?;
        if logps.len() != live.len() {
            return Err(Error::Msg(format!(
                "beam search: the step returned {} rows for {} hypotheses",
                logps.len(),
                live.len()
            )));
        }
        let mut cands: Vec<(usize, u32, f32)> = Vec::new();
        for (b, row) in logps.iter().enumerate() {
            if (cfg.eos as usize) >= row.len() {
                return Err(Error::Msg(format!(
                    "beam search: EOS id {} is outside the vocabulary of {}",
                    cfg.eos,
                    row.len()
                )));
            }
            cands.extend(
                row.iter()
                    .enumerate()
                    .filter(|(_, lp)| lp.is_finite())
                    .map(|(t, &lp)| (b, t as u32, live[b].1 + lp)),
            );
        }
        // Best first; ties keep the lower beam, then the lower token, so the search is deterministic.
        cands.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        let mut next = Vec::with_capacity(cfg.beam);
        for &(b, t, score) in cands.iter().take(2 * cfg.beam) {
            let mut tokens = live[b].0.clone();
            tokens.push(t);
            if t == cfg.eos {
                done.push(Hypothesis {
                    tokens,
                    score: normalised(score, len, cfg.length_penalty),
                });
            } else if next.len() < cfg.beam {
                next.push((tokens, score));
            }
        }
        done.sort_by(|a, b| b.score.total_cmp(&a.score));
        done.truncate(cfg.beam);
        live = next;
        if live.is_empty() {
            break;
        }
        if done.len() == cfg.beam {
            // Log-probabilities only fall as a hypothesis grows; with a penalty ≤ 1 the best a live one
            // can still reach is its current total over the longest allowed length.
            let worst = done[done.len() - 1].score;
            let best_live = live
                .iter()
                .map(|(_, s)| {
                    let reach = if cfg.length_penalty > 0.0 {
                        cfg.max_len
                    } else {
                        len
                    };
                    normalised(*s, reach, cfg.length_penalty)
                })
                .fold(f32::NEG_INFINITY, f32::max);
            if best_live <= worst {
                break;
            }
        }
        if len == cfg.max_len {
            done.extend(live.drain(..).map(|(tokens, s)| Hypothesis {
                score: normalised(s, tokens.len(), cfg.length_penalty),
                tokens,
            }));
        }
    }
    done.sort_by(|a, b| b.score.total_cmp(&a.score));
    done.truncate(cfg.beam);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy decoder: next-token log-probabilities depend on the last token only (token 0 = EOS).
    fn markov(table: &[[f32; 4]; 4]) -> impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>> + '_ {
        move |prefixes| {
            Ok(prefixes
                .iter()
                .map(|p| {
                    let last = p.last().copied().unwrap_or(3) as usize;
                    table[last].iter().map(|p| p.ln()).collect()
                })
                .collect())
        }
    }

    /// Every sequence of length ≤ max_len that ends in EOS (or is cut at max_len), with its score.
    fn exhaustive(table: &[[f32; 4]; 4], max_len: usize, penalty: f32) -> Hypothesis {
        let mut best = Hypothesis {
            tokens: vec![],
            score: f32::NEG_INFINITY,
        };
        let mut stack = vec![(Vec::<u32>::new(), 0f32)];
        while let Some((seq, lp)) = stack.pop() {
            for t in 0..4u32 {
                let last = seq.last().copied().unwrap_or(3) as usize;
                let (mut s, l) = (seq.clone(), lp + table[last][t as usize].ln());
                s.push(t);
                if t == 0 || s.len() == max_len {
                    let score = normalised(l, s.len(), penalty);
                    if score > best.score {
                        best = Hypothesis { tokens: s, score };
                    }
                } else {
                    stack.push((s, l));
                }
            }
        }
        best
    }

    // From the start (row 3) token 1 looks best (0.5), but it leads to a flat row; token 2 (0.4)
    // leads to an almost certain EOS. Greedy takes 1; a beam keeps 2 and wins.
    const TABLE: [[f32; 4]; 4] = [
        [0.97, 0.01, 0.01, 0.01],
        [0.25, 0.25, 0.25, 0.25],
        [0.97, 0.01, 0.01, 0.01],
        [0.05, 0.5, 0.4, 0.05],
    ];

    #[test]
    fn a_wide_beam_finds_what_greedy_misses() -> Result<()> {
        let cfg = |beam| BeamConfig {
            beam,
            max_len: 6,
            length_penalty: 0.0,
            eos: 0,
        };
        let greedy = search(cfg(1), markov(&TABLE))?;
        assert_eq!(
            greedy[0].tokens[0], 1,
            "greedy follows the locally best token"
        );
        let beam = search(cfg(4), markov(&TABLE))?;
        assert_eq!(beam[0].tokens, [2, 0]);
        assert!((beam[0].score - (0.4f32.ln() + 0.97f32.ln())).abs() < 1e-6);
        assert_eq!(beam[0], exhaustive(&TABLE, 6, 0.0));
        Ok(())
    }

    #[test]
    fn matches_exhaustive_search_with_length_normalisation() -> Result<()> {
        for penalty in [0.0, 0.5, 1.0] {
            for max_len in 1..=5 {
                let got = search(
                    BeamConfig {
                        beam: 64,
                        max_len,
                        length_penalty: penalty,
                        eos: 0,
                    },
                    markov(&TABLE),
                )?;
                let want = exhaustive(&TABLE, max_len, penalty);
                assert_eq!(
                    got[0].tokens, want.tokens,
                    "penalty {penalty}, max_len {max_len}"
                );
                assert!((got[0].score - want.score).abs() < 1e-5);
                assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
            }
        }
        Ok(())
    }

    #[test]
    fn bad_configs_and_steps_are_errors() {
        let cfg = BeamConfig {
            beam: 2,
            max_len: 3,
            length_penalty: 1.0,
            eos: 7,
        };
        assert!(search(BeamConfig { beam: 0, ..cfg }, markov(&TABLE)).is_err());
        assert!(
            search(cfg, markov(&TABLE)).is_err(),
            "EOS outside the vocabulary"
        );
        let short = |_: &[Vec<u32>]| Ok(vec![]);
        assert!(search(BeamConfig { eos: 0, ..cfg }, short).is_err());
    }
}
