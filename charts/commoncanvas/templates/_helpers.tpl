{{- define "commoncanvas.name" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "commoncanvas.peering" -}}{{ .Values.operator.peering | default (include "commoncanvas.name" .) }}{{- end -}}
{{- define "commoncanvas.objectStore" -}}{{ .Release.Name }}-object-store{{- end -}}
{{- define "commoncanvas.secret" -}}
{{- .Values.objectStore.existingSecret | default (include "commoncanvas.objectStore" .) -}}
{{- end -}}
{{- define "commoncanvas.labels" -}}
app.kubernetes.io/name: commoncanvas-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: commoncanvas
{{- end -}}
{{/* "true" where the cluster serves prometheus-operator's monitoring.coreos.com/v1, else empty. */}}
{{- define "commoncanvas.promOperator" -}}
{{- if and (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") -}}true{{- end -}}
{{- end -}}
