//! TBT (Liu et al., ACL 2023), ternary and binary transformers: the distillation objective that trains a
//! quantized student from its full-precision teacher (papers.md §1). The student's loss is the
//! cross-entropy on the targets plus the soft cross-entropy against the teacher's distribution plus the
//! MSE of every hidden state plus the MSE of every self-, cross- and decoder attention map, weights 1/1/1.

use crate::bart::BartOutput;
use trit::{Error, Result, Tensor};

/// The terms of one distillation loss (each a scalar tensor in the graph), and their sum.
#[derive(Clone, Debug)]
pub struct Distillation {
    pub total: Tensor,
    pub ce: Tensor,
    pub soft_ce: Tensor,
    pub hidden_mse: Tensor,
    pub attention_mse: Tensor,
}

/// Mean squared difference of two same-shaped tensors (the teacher's side carries no gradient).
fn mse(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        return Err(Error::ShapeMismatch {
            op: "distillation MSE",
            lhs: student.dims().to_vec(),
            rhs: teacher.dims().to_vec(),
        });
    }
    student.sub(&teacher.detach())?.sqr()?.mean_all()
}

/// Σ over layers of the MSE of each pair.
fn mse_sum(student: &[Tensor], teacher: &[Tensor], what: &str) -> Result<Tensor> {
    if student.len() != teacher.len() || student.is_empty() {
        trit::bail!(
            "distillation",
            "the student has {} {what} and the teacher {}",
            student.len(),
            teacher.len()
        );
    }
    let mut total = mse(&student[0], &teacher[0])?;
    for (s, t) in student.iter().zip(teacher).skip(1) {
        total = total.add(&mse(s, t)?)?;
    }
    Ok(total)
}

/// The TBT objective for `student` against `teacher` (same shapes) on `targets [b, t]`. Positions whose
/// target is `ignore` count in neither cross-entropy (the soft one is averaged over the kept positions).
pub fn distillation_loss(
    student: &BartOutput,
    teacher: &BartOutput,
    targets: &Tensor,
    ignore: Option<i64>,
) -> Result<Distillation> {
    let dims = student.logits.dims();
    let Some((&v, lead)) = dims.split_last() else {
        trit::bail!("distillation", "logits need a vocabulary dim");
    };
    if teacher.logits.dims() != dims || targets.dims() != lead {
        return Err(Error::ShapeMismatch {
            op: "distillation",
            lhs: dims.to_vec(),
            rhs: [teacher.logits.dims(), targets.dims()].concat(),
        });
    }
    let rows: usize = lead.iter().product();
    let logits = student.logits.reshape((rows, v))?;
    let flat_targets = targets.flatten_all()?;
    let ce = logits.cross_entropy(&flat_targets, ignore)?;

    // Soft cross-entropy −Σ p_teacher · log p_student per kept position, averaged over them.
    let kept: Vec<f32> = flat_targets
        .try_to_vec_i64()?
        .iter()
        .map(|&t| f32::from(u8::from(Some(t) != ignore)))
        .collect();
    let n_kept = kept.iter().sum::<f32>().max(1.0);
    let keep = Tensor::from_vec(kept, (rows, 1), logits.device())?;
    let p_teacher = teacher.logits.reshape((rows, v))?.detach().softmax(-1)?;
    let soft_ce = p_teacher
        .mul(&logits.log_softmax(-1)?)?
        .mul(&keep)?
        .sum_all()?
        .mul_scalar(-1.0 / n_kept)?;

    let hidden_mse = mse_sum(
        &student.encoder_hidden,
        &teacher.encoder_hidden,
        "encoder states",
    )?
    .add(&mse_sum(
        &student.decoder_hidden,
        &teacher.decoder_hidden,
        "decoder states",
    )?)?;
    let attention_mse = mse_sum(
        &student.encoder_attention,
        &teacher.encoder_attention,
        "encoder attention maps",
    )?
    .add(&mse_sum(
        &student.decoder_attention,
        &teacher.decoder_attention,
        "decoder attention maps",
    )?)?
    .add(&mse_sum(
        &student.cross_attention,
        &teacher.cross_attention,
        "cross-attention maps",
    )?)?;
    let total = ce.add(&soft_ce)?.add(&hidden_mse)?.add(&attention_mse)?;
    Ok(Distillation {
        total,
        ce,
        soft_ce,
        hidden_mse,
        attention_mse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trit::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
    }

    /// One layer of everything, tiny shapes; `x` shifts every tensor so student and teacher differ.
    fn output(logits: &[f32], x: f32) -> BartOutput {
        BartOutput {
            logits: t(logits, &[1, 2, 3]),
            encoder_hidden: vec![t(&[1.0 + x, 2.0], &[1, 1, 2])],
            decoder_hidden: vec![t(&[0.5, -x], &[1, 1, 2])],
            encoder_attention: vec![t(&[1.0], &[1, 1, 1, 1])],
            decoder_attention: vec![t(&[1.0 - x], &[1, 1, 1, 1])],
            cross_attention: vec![t(&[0.25, 0.75 + x], &[1, 1, 1, 2])],
        }
    }

    fn log_softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| v - lse).collect()
    }

    /// Every term against the formula evaluated by hand in f64.
    #[test]
    fn matches_the_formula() -> Result<()> {
        let s_logits = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        let t_logits = [0.0f32, 1.0, 2.0, 2.0, 1.0, 0.0];
        let (student, teacher) = (output(&s_logits, 0.5), output(&t_logits, 0.0));
        let targets = Tensor::from_vec(vec![1i32, 2], (1, 2), Device::Cpu)?;
        let d = distillation_loss(&student, &teacher, &targets, None)?;

        let rows = |v: &[f32]| -> Vec<Vec<f64>> {
            v.chunks(3)
                .map(|r| r.iter().map(|&x| x as f64).collect())
                .collect()
        };
        let (s, tt) = (rows(&s_logits), rows(&t_logits));
        let ce = -(log_softmax(&s[0])[1] + log_softmax(&s[1])[2]) / 2.0;
        let soft: f64 = (0..2)
            .map(|r| {
                let (ls, lt) = (log_softmax(&s[r]), log_softmax(&tt[r]));
                -(0..3).map(|j| lt[j].exp() * ls[j]).sum::<f64>()
            })
            .sum::<f64>()
            / 2.0;
        // Hidden: encoder (0.5² + 0)/2, decoder (0 + 0.5²)/2. Attention: encoder 0, decoder 0.5², cross 0.5²/2.
        let hidden = 0.125 + 0.125;
        let attention = 0.0 + 0.25 + 0.125;
        let close = |a: &Tensor, b: f64| (a.to_scalar().unwrap() as f64 - b).abs() < 1e-5;
        assert!(close(&d.ce, ce), "{} vs {ce}", d.ce.to_scalar()?);
        assert!(
            close(&d.soft_ce, soft),
            "{} vs {soft}",
            d.soft_ce.to_scalar()?
        );
        assert!(close(&d.hidden_mse, hidden));
        assert!(close(&d.attention_mse, attention));
        assert!(close(&d.total, ce + soft + hidden + attention));
        Ok(())
    }

    /// Ignored positions leave both cross-entropies; the teacher gets no gradient; the student does.
    #[test]
    fn ignores_padding_and_stops_gradients_at_the_teacher() -> Result<()> {
        let s_logits = t(&[1.0, 2.0, 0.5, -1.0, 0.0, 3.0], &[1, 2, 3]).var()?;
        let t_logits = t(&[0.0, 1.0, 2.0, 2.0, 1.0, 0.0], &[1, 2, 3]).var()?;
        let mut student = output(&[0.0; 6], 0.5);
        let mut teacher = output(&[0.0; 6], 0.0);
        student.logits = s_logits.clone();
        teacher.logits = t_logits.clone();
        let targets = Tensor::from_vec(vec![1i32, -100], (1, 2), Device::Cpu)?;
        let d = distillation_loss(&student, &teacher, &targets, Some(-100))?;
        let first = |v: &[f32]| log_softmax(&v.iter().map(|&x| x as f64).collect::<Vec<_>>());
        let (ls, lt) = (first(&[1.0, 2.0, 0.5]), first(&[0.0, 1.0, 2.0]));
        assert!((d.ce.to_scalar()? as f64 + ls[1]).abs() < 1e-5);
        let soft = -(0..3).map(|j| lt[j].exp() * ls[j]).sum::<f64>();
        assert!((d.soft_ce.to_scalar()? as f64 - soft).abs() < 1e-5);
        let grads = d.total.backward()?;
        assert!(grads.get(&t_logits).is_none(), "the teacher is a constant");
        let gs = grads
            .get(&s_logits)
            .expect("the student learns")
            .to_vec_f32();
        assert!(
            gs[3..].iter().all(|&g| g == 0.0),
            "the ignored position gets no gradient"
        );
        Ok(())
    }

    #[test]
    fn mismatched_outputs_are_errors() {
        let student = output(&[0.0; 6], 0.0);
        let mut teacher = output(&[0.0; 6], 0.0);
        teacher.cross_attention.clear();
        let targets = Tensor::from_vec(vec![1i32, 2], (1, 2), Device::Cpu).unwrap();
        assert!(distillation_loss(&student, &teacher, &targets, None).is_err());
        let bad_targets = Tensor::from_vec(vec![1i32], (1, 1), Device::Cpu).unwrap();
        assert!(distillation_loss(&student, &output(&[0.0; 6], 0.0), &bad_targets, None).is_err());
    }
}
