{{- define "commoncanvas.name" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "commoncanvas.objectStore" -}}{{ .Release.Name }}-object-store{{- end -}}
{{- define "commoncanvas.secret" -}}
{{- .Values.objectStore.existingSecret | default (include "commoncanvas.objectStore" .) -}}
{{- end -}}
{{- define "commoncanvas.labels" -}}
app.kubernetes.io/name: commoncanvas-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: commoncanvas
{{- end -}}
