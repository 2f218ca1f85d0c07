"""HTTP routers and schemas. The only package that knows HTTP."""
