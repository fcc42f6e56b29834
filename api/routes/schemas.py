"""Named schemas: a key stores a JSON Schema under a name, and its requests name it in
`response_format: {"type": "json_schema", "json_schema": {"name": ...}}` instead of sending it.
Each key sees only its own, as with jobs. Workers compile a schema once and keep it."""

from fastapi import APIRouter, Response, status
from sqlalchemy.exc import IntegrityError

from api.deps import ApiKeyDep, SessionDep
from api.schemas.output_formats import OutputFormatFields, SchemaCreate, SchemaPublic, SchemasPublic
from db.queries import schemas as schema_queries
from llmq.errors import SchemaNameTaken, SchemaNotFound

router = APIRouter(prefix="/v1/schemas", tags=["structured output"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SchemaPublic)
def create_schema(body: SchemaCreate, session: SessionDep, caller: ApiKeyDep) -> SchemaPublic:
    """Store a JSON Schema under a name; refused (400) if it cannot be enforced."""
    OutputFormatFields(structured_outputs={"json": body.json_schema}).checked_constraint()
    try:
        stored = schema_queries.create_schema(
            session,
            owner=caller.owner,
            name=body.name,
            schema=body.json_schema,
            description=body.description,
        )
        public = SchemaPublic.from_row(stored)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise SchemaNameTaken(
            f"this key has a schema named {body.name!r} already; delete it first or pick "
            "another name",
            param="name",
        ) from None
    return public


@router.get("", response_model=SchemasPublic)
def list_schemas(session: SessionDep, caller: ApiKeyDep) -> SchemasPublic:
    rows = schema_queries.list_schemas(session, caller.owner)
    return SchemasPublic(data=[SchemaPublic.from_row(row) for row in rows])


@router.get("/{name}", response_model=SchemaPublic)
def read_schema(name: str, session: SessionDep, caller: ApiKeyDep) -> SchemaPublic:
    stored = schema_queries.get_schema(session, caller.owner, name)
    if stored is None:
        raise SchemaNotFound(name)
    return SchemaPublic.from_row(stored)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_schema(name: str, session: SessionDep, caller: ApiKeyDep) -> Response:
    if not schema_queries.delete_schema(session, caller.owner, name):
        raise SchemaNotFound(name)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
