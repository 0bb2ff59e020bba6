//! ROUGE-1, ROUGE-2 and ROUGE-L (Lin, 2004) between a generated text and a reference, as the
//! `rouge_score` package computes them without stemming: both texts are lower-cased, every character
//! outside [a-z0-9] separates tokens, n-gram overlaps are clipped counts, ROUGE-L is the longest common
//! subsequence of the token lists, and each score is the F1 of its precision and recall (0 when either
//! side is empty). A corpus score is the mean of the per-pair scores.

use std::collections::HashMap;

/// Precision, recall and F1 of one ROUGE variant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Score {
    /// From `overlap` matched units out of `hyp` generated and `reference` reference units.
    fn from_counts(overlap: usize, hyp: usize, reference: usize) -> Score {
        if overlap == 0 || hyp == 0 || reference == 0 {
            return Score::default();
        }
        let precision = overlap as f64 / hyp as f64;
        let recall = overlap as f64 / reference as f64;
        Score {
            precision,
            recall,
            f1: 2.0 * precision * recall / (precision + recall),
        }
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one pair (or their means over a corpus).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rouge {
    pub rouge1: Score,
    pub rouge2: Score,
    pub rouge_l: Score,
}

/// The lower-cased alphanumeric tokens of `text`.
pub fn tokenize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if n > 0 && tokens.len() >= n {
        for g in tokens.windows(n) {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    counts
}

/// ROUGE-N from token lists: clipped n-gram overlap over the generated and reference n-gram counts.
fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> Score {
    let (h, r) = (ngram_counts(hyp, n), ngram_counts(reference, n));
    let overlap = h
        .iter()
        .map(|(g, &c)| c.min(r.get(g).copied().unwrap_or(0)))
        .sum();
    Score::from_counts(
        overlap,
        hyp.len().saturating_sub(n - 1),
        reference.len().saturating_sub(n - 1),
    )
}

/// Length of the longest common subsequence (two rows of the dynamic program).
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The scores of a generated text against its reference.
pub fn score(generated: &str, reference: &str) -> Rouge {
    let (h, r) = (tokenize(generated), tokenize(reference));
    Rouge {
        rouge1: rouge_n(&h, &r, 1),
        rouge2: rouge_n(&h, &r, 2),
        rouge_l: Score::from_counts(lcs(&h, &r), h.len(), r.len()),
    }
}

/// The mean of the per-pair scores over (generated, reference) pairs (zeros for no pairs).
pub fn corpus<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Rouge {
    let mut sum = Rouge::default();
    let mut n = 0usize;
    let add = |acc: &mut Score, s: Score| {
        acc.precision += s.precision;
        acc.recall += s.recall;
        acc.f1 += s.f1;
    };
    for (g, r) in pairs {
        let s = score(g, r);
        add(&mut sum.rouge1, s.rouge1);
        add(&mut sum.rouge2, s.rouge2);
        add(&mut sum.rouge_l, s.rouge_l);
        n += 1;
    }
    if n == 0 {
        return sum;
    }
    let mean = |s: Score| Score {
        precision: s.precision / n as f64,
        recall: s.recall / n as f64,
        f1: s.f1 / n as f64,
    };
    Rouge {
        rouge1: mean(sum.rouge1),
        rouge2: mean(sum.rouge2),
        rouge_l: mean(sum.rouge_l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn tokenizes_like_rouge_score() {
        assert_eq!(
            tokenize("The cat's hat — 2 Hats, e.g. (big)!"),
            ["the", "cat", "s", "hat", "2", "hats", "e", "g", "big"]
        );
        assert!(tokenize(" ,.;: ").is_empty());
    }

    /// Worked by hand. hyp "the cat sat on the mat" (6 tokens), ref "the cat lay on the red mat" (7):
    /// unigrams: the ×2 (ref ×2) + cat + on + mat = 5 matched; P 5/6, R 5/7.
    /// bigrams: hyp {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat lay, lay on, on the,
    /// the red, red mat}: "the cat" and "on the" match, P 2/5, R 2/6.
    /// LCS: the cat on the mat = 5, P 5/6, R 5/7 (as ROUGE-1 here).
    #[test]
    fn matches_hand_computed_scores() {
        let s = score("the cat sat on the mat", "the cat lay on the red mat");
        let f = |p: f64, r: f64| 2.0 * p * r / (p + r);
        assert!(close(s.rouge1.precision, 5.0 / 6.0));
        assert!(close(s.rouge1.recall, 5.0 / 7.0));
        assert!(close(s.rouge1.f1, f(5.0 / 6.0, 5.0 / 7.0)));
        assert!(close(s.rouge2.precision, 2.0 / 5.0));
        assert!(close(s.rouge2.recall, 2.0 / 6.0));
        assert!(close(s.rouge2.f1, f(2.0 / 5.0, 2.0 / 6.0)));
        assert!(close(s.rouge_l.f1, f(5.0 / 6.0, 5.0 / 7.0)));
    }

    /// Clipping: "the the the" against "the cat" matches one "the", not three. ROUGE-L differs from
    /// ROUGE-1 when order differs: "b a" vs "a b" share both unigrams but an LCS of 1.
    #[test]
    fn clips_repeats_and_respects_order() {
        let s = score("the the the", "the cat");
        assert!(close(s.rouge1.precision, 1.0 / 3.0));
        assert!(close(s.rouge1.recall, 1.0 / 2.0));
        assert_eq!(s.rouge2, Score::default());
        let s = score("b a", "a b");
        assert!(close(s.rouge1.f1, 1.0));
        assert!(close(s.rouge_l.f1, 0.5));
        assert_eq!(s.rouge2.f1, 0.0);
    }

    /// Checked against Google's rouge-score 0.1.2 (`RougeScorer(['rouge1', 'rouge2', 'rougeL'])`, no
    /// stemming): P/R 0.555556/0.714286, 0/0 and 0.333333/0.428571.
    #[test]
    fn matches_rouge_score_on_punctuated_text() {
        let s = score(
            "The cat's hat — 2 Hats, e.g. (big)!",
            "a hat for the big cat 2",
        );
        assert!(close(s.rouge1.precision, 5.0 / 9.0) && close(s.rouge1.recall, 5.0 / 7.0));
        assert_eq!(s.rouge2, Score::default());
        assert!(close(s.rouge_l.precision, 3.0 / 9.0) && close(s.rouge_l.recall, 3.0 / 7.0));
    }

    #[test]
    fn identical_empty_and_disjoint_texts() {
        let s = score("A small test.", "a SMALL test");
        for v in [s.rouge1, s.rouge2, s.rouge_l] {
            assert!(close(v.f1, 1.0) && close(v.precision, 1.0) && close(v.recall, 1.0));
        }
        assert_eq!(score("", "something"), Rouge::default());
        assert_eq!(score("something", ""), Rouge::default());
        assert_eq!(score("x y", "z w"), Rouge::default());
        // One token on each side has no bigram: ROUGE-2 is 0, not NaN.
        assert_eq!(score("x", "x").rouge2, Score::default());
    }

    #[test]
    fn corpus_scores_are_per_pair_means() {
        let c = corpus([("a b", "a b"), ("a", "b")]);
        assert!(close(c.rouge1.f1, 0.5));
        assert!(close(c.rouge_l.recall, 0.5));
        assert_eq!(corpus(std::iter::empty()), Rouge::default());
    }
}
