//! A run's report: JSON (everything), Markdown (the summary a person reads) and an SVG plot
//! of every phase's latency by percentile.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::loadgen::PhaseResult;

/// One scenario's run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub title: String,
    pub command: String,
    pub machine: Machine,
    pub phases: Vec<PhaseResult>,
    /// Named numbers beyond the phases (CPU per call, RSS, sockets, ...).
    pub measures: Vec<(String, f64, String)>,
    /// `name = value (target)`: the ratios against baselines measured in the same run.
    pub ratios: Vec<Ratio>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    pub target: String,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_gib: kib / 1024.0 / 1024.0,
        }
    }
}

impl Report {
    pub fn ratio(&mut self, name: &str, value: f64, target: &str, met: Option<bool>) {
        self.ratios.push(Ratio {
            name: name.into(),
            value,
            target: target.into(),
            met,
        });
    }

    pub fn measure(&mut self, name: &str, value: f64, unit: &str) {
        self.measures.push((name.into(), value, unit.into()));
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let base = dir.join(&self.scenario);
        std::fs::write(
            base.with_extension("json"),
            serde_json::to_vec_pretty(self).unwrap_or_default(),
        )?;
        std::fs::write(base.with_extension("md"), self.markdown())?;
        std::fs::write(base.with_extension("svg"), self.svg())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {} — {}\n", self.scenario.to_uppercase(), self.title);
        let _ = writeln!(s, "Command: `{}`  ", self.command);
        let _ = writeln!(
            s,
            "Machine: {} cores, {}, {:.0} GiB\n",
            self.machine.nproc, self.machine.cpu, self.machine.memory_gib
        );
        let _ = writeln!(
            s,
            "| phase | rate (req/s) | sent | achieved (req/s) | 2xx (req/s) | statuses | p50 ms | p99 ms | p99.9 ms | max ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for p in &self.phases {
            let statuses = p
                .status
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" ");
            let rate = if p.rate > 0.0 {
                format!("{:.0}", p.rate)
            } else {
                "closed loop".into()
            };
            let _ = writeln!(
                s,
                "| {} | {rate} | {} | {:.0} | {:.0} | {statuses} | {:.2} | {:.2} | {:.2} | {:.2} |",
                p.name,
                p.sent,
                p.achieved_rps,
                p.goodput_rps,
                p.latency_ms.p50,
                p.latency_ms.p99,
                p.latency_ms.p999,
                p.latency_ms.max
            );
        }
        if !self.measures.is_empty() {
            let _ = writeln!(s, "\n| measure | value |\n|---|---|");
            for (n, v, u) in &self.measures {
                let _ = writeln!(s, "| {n} | {v:.2} {u} |");
            }
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(s, "\n| ratio | value | target | met |\n|---|---|---|---|");
            for r in &self.ratios {
                let met = match r.met {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                };
                let _ = writeln!(s, "| {} | {:.3} | {} | {met} |", r.name, r.value, r.target);
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n- {n}");
        }
        s
    }

    /// Latency (log scale) against percentile (the "nines", log scale), one line per phase.
    pub fn svg(&self) -> String {
        let (w, h, left, bottom, top, right) = (760.0, 420.0, 70.0, 50.0, 40.0, 200.0);
        let pw = w - left - right;
        let ph = h - top - bottom;
        // x: -log10(1 - p/100), 0 .. 5 (99.999 %).
        let x = |p: f64| left + pw * ((-(1.0 - p / 100.0).max(1e-5).log10()) / 5.0);
        let values: Vec<f64> = self
            .phases
            .iter()
            .flat_map(|p| p.curve.iter().map(|c| c.1))
            .filter(|v| *v > 0.0)
            .collect();
        let lo = values
            .iter()
            .cloned()
            .fold(f64::MAX, f64::min)
            .max(0.01)
            .log10()
            .floor();
        let hi = values
            .iter()
            .cloned()
            .fold(0.01, f64::max)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let y = |ms: f64| top + ph * (1.0 - (ms.max(0.01).log10() - lo) / (hi - lo));
        let colours = [
            "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
        ];
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"14\">{} — latency by percentile (from intended send time)</text>\n",
            self.scenario.to_uppercase()
        );
        for (i, label) in ["0", "90", "99", "99.9", "99.99", "99.999"]
            .iter()
            .enumerate()
        {
            let px = left + pw * i as f64 / 5.0;
            let _ = writeln!(
                s,
                "<line x1=\"{px}\" y1=\"{top}\" x2=\"{px}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{px}\" y=\"{}\" text-anchor=\"middle\">{label}%</text>",
                top + ph,
                top + ph + 18.0
            );
        }
        let mut decade = lo;
        while decade <= hi {
            let py = y(10f64.powf(decade));
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} ms</text>",
                left + pw,
                left - 6.0,
                py + 4.0,
                10f64.powf(decade)
            );
            decade += 1.0;
        }
        for (i, p) in self.phases.iter().enumerate() {
            let c = colours[i % colours.len()];
            let points: Vec<String> = p
                .curve
                .iter()
                .map(|(pct, ms)| format!("{:.1},{:.1}", x(*pct), y(*ms)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
                points.join(" ")
            );
            let ly = top + 16.0 * i as f64 + 10.0;
            let _ = writeln!(
                s,
                "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\">{}</text>",
                left + pw + 10.0,
                ly - 4.0,
                left + pw + 28.0,
                ly,
                escape(&p.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
