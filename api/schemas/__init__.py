"""Request and response bodies, one module per resource; OpenAI's wire shapes in openai.py."""
