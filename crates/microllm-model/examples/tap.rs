//! Development aid: evaluates ids (the first PREFILL as one batch, the rest one by one) and
//! prints the top-5 logits of the last position.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let m = microllm_model::Model::load(std::path::Path::new(&a[1]), Default::default()).unwrap();
    let ids: Vec<u32> = a[2].split(',').map(|s| s.parse().unwrap()).collect();
    let n_first: usize = std::env::var("PREFILL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ids.len());
    let mut st = m
        .new_state(microllm_model::StateOptions {
            n_ctx: 512,
            n_batch: 512,
            ..Default::default()
        })
        .unwrap();
    m.forward(&mut st, &ids[..n_first], microllm_model::Logits::Last)
        .unwrap();
    for t in &ids[n_first..] {
        m.forward(
            &mut st,
            std::slice::from_ref(t),
            microllm_model::Logits::Last,
        )
        .unwrap();
    }
    let l = st.logits();
    let mut idx: Vec<usize> = (0..l.len()).collect();
    idx.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap());
    for &i in &idx[..5] {
        print!("[{i},{:.4}]", l[i]);
    }
    println!();
}
