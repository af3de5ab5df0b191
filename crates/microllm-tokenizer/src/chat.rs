//! Chat templates: `tokenizer.chat_template` rendered with minijinja the way HF transformers
//! renders it with Jinja2 (trim_blocks, lstrip_blocks, loop controls, Python string methods).

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::TokenizerError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

/// Jinja2's error text plus where it happened.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl ChatTemplate {
    /// Compiles `source` (Jinja2 as HF chat templates write it).
    pub fn new(source: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        // HF: jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
        // extensions=[loopcontrols]); Jinja2 drops one trailing newline by default.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| TokenizerError::TemplateSyntax {
                message: describe(&e),
            })?;
        Ok(ChatTemplate { env })
    }

    /// Compiles the model's own `tokenizer.chat_template`.
    ///
    /// [`TokenizerError::NoChatTemplate`] when the model has none (base models such as Gemma 3
    /// 270M): the caller must then take a template from the user or send raw text.
    pub fn for_model(tok: &crate::Tokenizer) -> Result<Self, TokenizerError> {
        Self::new(tok.chat_template().ok_or(TokenizerError::NoChatTemplate)?)
    }

    /// Renders the conversation. `bos_token`/`eos_token` are the token texts the template may
    /// insert; `add_generation_prompt` asks for the assistant turn header at the end.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, TokenizerError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TokenizerError::TemplateRender {
                message: describe(&e),
            })?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| TokenizerError::TemplateRender {
            message: describe(&e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src).unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi  ")], false, "", "")
            .unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let e = t.render(&[], false, "", "").unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }

    #[test]
    fn syntax_error_is_reported() {
        let e = ChatTemplate::new("{% for %}").unwrap_err();
        assert!(matches!(e, TokenizerError::TemplateSyntax { .. }), "{e}");
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let src = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role.upper() }}:{% if m.content.startswith('x') %}x{% endif %};{% endfor %}{{ bos_token }}";
        let t = ChatTemplate::new(src).unwrap();
        let msgs = [
            ChatMessage::new("user", "xa"),
            ChatMessage::new("assistant", "b"),
            ChatMessage::new("user", "c"),
        ];
        assert_eq!(
            t.render(&msgs, false, "<s>", "</s>").unwrap(),
            "USER:x;ASSISTANT:;<s>"
        );
    }
}
