pub mod gemma;
pub mod llama;
