//! The comparison of a base model and its variants: one table (Markdown and JSON) and one
//! chart of quality against size (a small hand-written SVG: no plotting dependency, and the
//! file opens in any browser).

use serde::Serialize;

/// One model in the comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Short label (the file name).
    pub name: String,
    pub path: String,
    /// Quantization label (`general.file_type`, e.g. "Q4_K_M").
    pub quant: String,
    pub n_layer: usize,
    /// Tensor data bytes.
    pub size_bytes: u64,
    pub bits_per_weight: f64,
    pub ppl: f64,
    pub ppl_err: f64,
    /// Mean KL divergence from the base model (nats per token); 0 for the base.
    pub kld: f64,
    /// Share of tokens where the most likely token agrees with the base model's (0..1).
    pub top1: f64,
    pub ppl_ratio: f64,
    /// Prompt processing and generation speed (tokens/s), when measured.
    pub pp_ts: Option<f64>,
    pub tg_ts: Option<f64>,
}

/// The whole comparison (what `compare --json` writes).
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub text_file: String,
    pub n_ctx: usize,
    pub n_chunks: usize,
    pub n_tokens_scored: usize,
    /// The first row is the base model.
    pub rows: Vec<Row>,
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.1}"))
}

impl Comparison {
    /// A Markdown table, one row per model.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Perplexity and KL divergence on {} ({} windows of {} tokens, {} scored tokens); \
             KLD and top-1 against the first row.\n\n",
            self.text_file, self.n_chunks, self.n_ctx, self.n_tokens_scored
        );
        s.push_str(
            "| model | type | layers | size (MiB) | bits/weight | PPL | PPL ratio | KLD | top-1 | pp t/s | tg t/s |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.2} | {:.4} ± {:.4} | {:.4} | {:.5} | {:.2}% | {} | {} |\n",
                r.name,
                r.quant,
                r.n_layer,
                r.size_bytes as f64 / (1024.0 * 1024.0),
                r.bits_per_weight,
                r.ppl,
                r.ppl_err,
                r.ppl_ratio,
                r.kld,
                r.top1 * 100.0,
                opt(r.pp_ts),
                opt(r.tg_ts),
            ));
        }
        s
    }

    /// The comparison as pretty JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A scatter chart: x = size (MiB), y = perplexity, one labelled point per model (label:
    /// name, type and speeds).
    pub fn svg(&self) -> String {
        let (w, h) = (900.0f64, 560.0f64);
        let (ml, mr, mt, mb) = (80.0, 40.0, 50.0, 70.0);
        let xs: Vec<f64> = self
            .rows
            .iter()
            .map(|r| r.size_bytes as f64 / (1024.0 * 1024.0))
            .collect();
        let ys: Vec<f64> = self.rows.iter().map(|r| r.ppl).collect();
        let range = |v: &[f64]| {
            let lo = v
                .iter()
                .copied()
                .filter(|x| x.is_finite())
                .fold(f64::INFINITY, f64::min);
            let hi = v
                .iter()
                .copied()
                .filter(|x| x.is_finite())
                .fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() || !hi.is_finite() {
                return (0.0, 1.0);
            }
            let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.01).max(1e-6);
            (lo - pad, hi + pad)
        };
        let (x0, x1) = range(&xs);
        let (y0, y1) = range(&ys);
        let px = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
        let py = |y: f64| h - mb - (y - y0) / (y1 - y0) * (h - mt - mb);
        let mut s = String::new();
        s.push_str(&format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
        ));
        s.push_str(&format!(
            "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
        ));
        s.push_str(&format!(
            "<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">{}</text>\n",
            w / 2.0,
            escape(&format!(
                "Perplexity against size on {} ({} × {} tokens)",
                self.text_file, self.n_chunks, self.n_ctx
            ))
        ));
        // Axes and ticks.
        s.push_str(&format!(
            "<line x1=\"{ml}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
            h - mb,
            w - mr,
            h - mb
        ));
        s.push_str(&format!(
            "<line x1=\"{ml}\" y1=\"{mt}\" x2=\"{ml}\" y2=\"{}\" stroke=\"black\"/>\n",
            h - mb
        ));
        for i in 0..=5 {
            let f = i as f64 / 5.0;
            let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
            s.push_str(&format!(
                "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#ddd\"/>\n<text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{4:.1}</text>\n",
                px(xv), mt, h - mb, h - mb + 18.0, xv
            ));
            s.push_str(&format!(
                "<line x1=\"{0}\" y1=\"{1:.1}\" x2=\"{2}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>\n<text x=\"{3}\" y=\"{4:.1}\" text-anchor=\"end\">{5:.3}</text>\n",
                ml, py(yv), w - mr, ml - 6.0, py(yv) + 4.0, yv
            ));
        }
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">size (MiB of weights)</text>\n",
            (ml + w - mr) / 2.0,
            h - 25.0
        ));
        s.push_str(&format!(
            "<text x=\"20\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {0})\">perplexity (lower is better)</text>\n",
            (mt + h - mb) / 2.0
        ));
        for (i, r) in self.rows.iter().enumerate() {
            if !xs[i].is_finite() || !ys[i].is_finite() {
                continue;
            }
            let (cx, cy) = (px(xs[i]), py(ys[i]));
            let color = if i == 0 { "#d62728" } else { "#1f77b4" };
            let mut label = format!("{} ({})", r.name, r.quant);
            if let (Some(pp), Some(tg)) = (r.pp_ts, r.tg_ts) {
                label.push_str(&format!(" — pp {pp:.0} t/s, tg {tg:.0} t/s"));
            }
            // Labels go left of points in the right half, so they stay inside the chart.
            let (anchor, dx) = if cx > w / 2.0 {
                ("end", -8.0)
            } else {
                ("start", 8.0)
            };
            let dy = if i % 2 == 0 { -6.0 } else { 14.0 };
            s.push_str(&format!(
                "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"5\" fill=\"{color}\"><title>{}</title></circle>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" font-size=\"11\">{}</text>\n",
                escape(&format!("{label}; PPL {:.4}, KLD {:.5}", r.ppl, r.kld)),
                cx + dx,
                cy + dy,
                escape(&label)
            ));
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Escapes text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, size: u64, ppl: f64) -> Row {
        Row {
            name: name.into(),
            path: format!("/tmp/{name}"),
            quant: "Q4_K_M".into(),
            n_layer: 30,
            size_bytes: size,
            bits_per_weight: 4.5,
            ppl,
            ppl_err: 0.1,
            kld: 0.01,
            top1: 0.9,
            ppl_ratio: 1.01,
            pp_ts: Some(100.0),
            tg_ts: Some(50.0),
        }
    }

    #[test]
    fn svg_is_xml_even_with_awkward_names() {
        let c = Comparison {
            text_file: "a<b>&\"c\".txt".into(),
            n_ctx: 512,
            n_chunks: 2,
            n_tokens_scored: 510,
            rows: vec![
                row("base & co", 100 << 20, 10.0),
                row("<q4>", 40 << 20, 11.0),
            ],
        };
        let svg = c.svg();
        let doc = roxmltree::Document::parse(&svg).expect("valid XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert_eq!(
            doc.descendants()
                .filter(|n| n.tag_name().name() == "circle")
                .count(),
            2
        );
        let md = c.markdown();
        assert_eq!(md.lines().filter(|l| l.starts_with("| ")).count(), 3);
    }
}
